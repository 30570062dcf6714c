"""The declared plugin API: everything a plugin may import from the kernel.

Plugins import ``darkmatter``, ``darkmatter.api`` and ``darkmatter.testing`` only (a meta-test checks it),
so the kernel can move its insides freely. Everything a plugin needs at run time reaches it through the
``node`` argument of every hook; this module gives the types, markers and pure helpers.
"""

from darkmatter import PROTOCOL_VERSION, __version__, hookimpl
from darkmatter.actions import (ask_impression, disconnect, expire_message, forward_message, request_connection,
                                respond_connection, respond_message, send_message)
from darkmatter.config import Config, ConfigError
from darkmatter.discovery import DiscoverySource
from darkmatter.identity import (Identity, peer_update_string, v1_string, v2_beacon, v2_message, v2_string,
                                 v2_webhook_update, verify)
from darkmatter.mesh import Caller, handle
from darkmatter.node import Node, StartupError
from darkmatter.server import client_ip, error_response, read_json
from darkmatter.storage import Storage
from darkmatter.tools import Session, Tool, ToolError, boolean, integer, string
from darkmatter.transport import Reply, Transport, TransportUnavailable
from darkmatter.wire import (FRESH_SECONDS, MAX_BODY, MAX_ID, ProtocolError, bad, check_content, check_id,
                             check_message_id, check_metadata, cj, endpoint, forbidden, h, host_of, is_fresh,
                             is_self_certifying, loads_object, new_message_id, normalize, now_iso, parse_ts)

__all__ = [
    # markers and versions
    "hookimpl", "__version__", "PROTOCOL_VERSION",
    # the node and its settings
    "Node", "StartupError", "Config", "ConfigError",
    # MCP tools
    "Tool", "ToolError", "Session", "string", "integer", "boolean",
    # transports and the inbound entry
    "Transport", "Reply", "TransportUnavailable", "Caller", "handle",
    # discovery and storage
    "DiscoverySource", "Storage",
    # outbound mesh operations (what the agent's tools do)
    "request_connection", "respond_connection", "disconnect", "send_message", "forward_message",
    "respond_message", "expire_message", "ask_impression",
    # HTTP route helpers
    "read_json", "error_response", "client_ip",
    # identity and signatures (docs/protocol.md §3)
    "Identity", "verify", "v1_string", "v2_string", "v2_message", "v2_webhook_update", "v2_beacon",
    "peer_update_string",
    # wire rules (docs/protocol.md §2)
    "ProtocolError", "bad", "forbidden", "MAX_BODY", "MAX_ID", "FRESH_SECONDS", "now_iso", "is_fresh",
    "parse_ts", "check_id", "check_message_id", "is_self_certifying", "new_message_id", "endpoint",
    "normalize", "host_of", "loads_object", "h", "cj", "check_content", "check_metadata",
    # the control plane for people and other clients on the node's port (docs/protocol.md §12)
    "live_status", "check_control_request",
]


def live_status(node: Node) -> list[str]:
    """The node's live status lines, as the ``darkmatter_status`` tool shows them (a summary line, then the
    plugins' ``dm_status_lines``)."""
    from darkmatter.mcp import live_status as lines  # NOTE: lazy; the MCP SDK is slow to import

    return lines(node)


def check_control_request(node: Node, scope: dict):
    """The /mcp admission rules for another control-plane route on the node's port (docs/protocol.md §12.2,
    §12.3): Host (421), Origin (403) and loopback-or-bearer-token (401).

    Returns ``(refusal, local)``: a response to send instead of serving the request (or None), and whether the
    client is a loopback caller. Call it only on a started node."""
    return node.mcp.check_request(scope)
