"""Discover DarkMatter nodes on this machine by scanning loopback ports."""
