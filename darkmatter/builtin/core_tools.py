"""The primitives' MCP tools (filled in with the MCP server)."""
