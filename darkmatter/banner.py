"""The first-run banner of ``darkmatter run``: what a person at a terminal can do next.

Shown on stderr, and only when stderr is a terminal (never on stdout, which carries MCP in stdio mode): the
console URL, the exact lines that add the node to Claude Code (HTTP and stdio) and the ``.mcp.json`` snippet,
whether the node auto-accepts connection requests (genesis) and how to change that, and where its state lives.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from darkmatter.node import Node

CONSOLE_PATH = "/ui"


def command_line() -> list[str]:
    """How to start this same installation again: the ``darkmatter`` script beside this Python, else ``-m``."""
    script = Path(sys.executable).parent / "darkmatter"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "darkmatter"]


def has_console(node: Node) -> bool:
    return any(getattr(route, "path", None) == CONSOLE_PATH for route in node.routes)


def text(node: Node) -> str:
    local = f"http://127.0.0.1:{node.port}"
    mcp_url = f"{local}/mcp"
    name = node.state.get("display_name")
    who = f'"{name}" ({node.agent_id[:12]})' if name else node.agent_id[:12]
    env = [f"DARKMATTER_PORT={node.port}"]
    default_state = Path(node.config.env.get("HOME") or Path.home()) / ".darkmatter" / "state" / f"{node.port}.json"
    if Path(node.config.state_file) != default_state:
        env.append(f"DARKMATTER_STATE_FILE={node.config.state_file}")
    stdio = ["claude", "mcp", "add", "--transport", "stdio"]
    for item in env:
        stdio += ["--env", item]
    stdio += ["darkmatter", "--", *command_line(), "run"]
    snippet = json.dumps({"mcpServers": {"darkmatter": {"type": "http", "url": mcp_url}}})
    if node.state.get("is_genesis"):
        policy = ("auto-accepted (a genesis node). Set DARKMATTER_GENESIS=false to decide on each request "
                  "yourself (console, or `darkmatter pending` / `accept` / `reject`).")
    else:
        policy = ("wait for your decision (console, or `darkmatter pending` / `accept` / `reject`). "
                  "DARKMATTER_GENESIS=true auto-accepts them.")
    ui = "darkmatter ui" if node.port == 8100 else f"darkmatter ui --port {node.port}"
    console = (f"{local}{CONSOLE_PATH}   (or `{ui}`)" if has_console(node)
               else "not loaded (install or enable the console plugin)")
    lines = [
        f"DarkMatter node {who} is running at {node.base_url}",
        f"  Console       {console}",
        f"  Claude Code   claude mcp add --transport http darkmatter {mcp_url}",
        f"                {shlex.join(stdio)}",
        f"  .mcp.json     {snippet}",
        f"  Connections   {policy}",
        f"  State         {node.config.state_file} (bearer token for non-local clients beside it)",
    ]
    return "\n".join(lines) + "\n"


def show(node: Node, stream: TextIO | None = None) -> bool:
    """Write the banner to stderr when it is a terminal; True if it was written."""
    stream = stream if stream is not None else sys.stderr
    try:
        if stream is None or not stream.isatty():
            return False
        stream.write(text(node))
        stream.flush()
    except (OSError, ValueError):  # a closed or broken stderr must not stop the node
        return False
    return True
