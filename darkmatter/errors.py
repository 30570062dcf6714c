"""Errors the kernel reports to whoever started the node."""


class StartupError(Exception):
    """The node cannot start; the message says why and what to do."""
