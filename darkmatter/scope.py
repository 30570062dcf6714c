"""Sessions scoped to one message (docs/protocol.md §12.6): what an agent spawned for a message may do.

A plugin that starts an agent for a message (autospawn) asks the node for a session token scoped to that
message (:func:`grant`), hands it to the agent's MCP relay (``DARKMATTER_SESSION_TOKEN``), which sends it on
every ``/mcp`` request as ``X-DarkMatter-Session``, and revokes it when the agent ends. A request carrying the
header is that scoped session whatever its TCP peer (loopback included); an unknown or revoked token is 401,
never a fallback to a full local session. The node enforces the scope on every tool call, whatever the
agent's own tool allowlist says:

* the message's own tools (``get_message``, ``respond_message``, ``forward_message``) only for that message;
* inbox reads (``list_inbox``, ``wait_for_message``) see only that message;
* other read-only tools that never leave the node, except reads of the owner's other conversations
  (``list_messages``, ``get_sent_message``);
* every other tool answers a tool error.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from darkmatter.node import Node
    from darkmatter.tools import Tool

HEADER = "x-darkmatter-session"
ENV = "DARKMATTER_SESSION_TOKEN"
MESSAGE_TOOLS = frozenset({"darkmatter_get_message", "darkmatter_respond_message", "darkmatter_forward_message"})
NARROWED_READS = frozenset({"darkmatter_list_inbox", "darkmatter_wait_for_message"})
PRIVATE_READS = frozenset({"darkmatter_list_messages", "darkmatter_get_sent_message"})
# What a spawned agent needs, for an allowlist such as Claude Code's --allowedTools.
SPAWNED_AGENT_TOOLS = ("darkmatter_get_message", "darkmatter_respond_message", "darkmatter_forward_message",
                       "darkmatter_list_inbox", "darkmatter_list_connections", "darkmatter_get_identity")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def scopes(node: Node) -> dict[str, str]:
    """token digest -> message_id of the node's live scoped sessions."""
    return node.plugin_state("darkmatter.scope", dict)


def grant(node: Node, message_id: str) -> str:
    """A new session token scoped to ``message_id`` (64 hex characters); only its digest is kept."""
    token = secrets.token_hex(32)
    scopes(node)[_digest(token)] = message_id
    return token


def revoke(node: Node, token: str) -> None:
    scopes(node).pop(_digest(token), None)


def lookup(node: Node, token: str) -> str | None:
    """The message a presented token is scoped to, or None (unknown or revoked)."""
    wanted = _digest(token)
    for digest, message_id in scopes(node).items():
        if hmac.compare_digest(digest, wanted):
            return message_id
    return None


def refusal(tool: Tool, arguments: dict[str, Any], message_id: str) -> str | None:
    """Why a session scoped to ``message_id`` may not make this call, or None."""
    if tool.name in MESSAGE_TOOLS:
        if arguments.get("message_id") != message_id:
            return (f"This session was started for message {message_id!r} and may only read, answer or forward "
                    f"that message.")
        return None
    if tool.name in NARROWED_READS:
        return None
    if tool.read_only and not tool.open_world and tool.name not in PRIVATE_READS:
        return None
    return (f"{tool.name} is not available to a session started for one message ({message_id!r}): it may read, "
            "answer or forward that message and call read-only tools (docs/protocol.md §12.6).")
