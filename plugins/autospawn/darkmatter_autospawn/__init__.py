"""Start an agent for each incoming DarkMatter message."""
