"""The declared plugin API: everything a plugin may import from the kernel.

Plugins import ``darkmatter``, ``darkmatter.api`` and ``darkmatter.testing`` only (``tests/test_meta.py``
checks it), so the kernel can move its insides freely. What a plugin needs at run time reaches it through
the ``node`` argument of every hook; this module gives the types, markers, operations and pure helpers.

* Inbound: a transport hands every request it receives to :func:`handle` (``ROUTES`` and :func:`route_of`
  give the HTTP shape of each operation).
* Outbound: :func:`call` reaches a URL, :func:`deliver` a connection, through the node's transports; the
  agent-level operations (:func:`send_message`, :func:`request_connection`, ...) are what the tools do.
"""

from darkmatter import PROTOCOL_VERSION, __version__, hookimpl
from darkmatter.config import Config, ConfigError
from darkmatter.discovery import DiscoverySource
from darkmatter.identity import (Identity, peer_update_string, v1_string, v2_beacon, v2_message, v2_string,
                                 v2_webhook_update, verify)
from darkmatter.mesh.checks import rate_key
from darkmatter.mesh.connections import agent_url_for, known_03, mark_03
from darkmatter.mesh.dispatch import call, check, deliver
from darkmatter.mesh.healing import broadcast_peer_update, fetch_well_known, recover
from darkmatter.mesh.inbound import (REFUSED_WHEN_INACTIVE, ROUTES, external_message, handle, inactive_check,
                                     route_of)
from darkmatter.mesh.outbound import (ask_impression, disconnect, expire_message, forward_message,
                                      request_connection, respond_connection, respond_message, send_message)
from darkmatter.mesh.transport import LARGE, SMALL, Blocked, Caller, Reply, Transport, TransportUnavailable
from darkmatter.node import Node, StartupError
from darkmatter.plugins import GROUP as PLUGIN_GROUP
from darkmatter.plugins import active_plugins
from darkmatter.scope import ENV as SESSION_ENV
from darkmatter.scope import SPAWNED_AGENT_TOOLS
from darkmatter.scope import grant as grant_session_scope
from darkmatter.scope import revoke as revoke_session_scope
from darkmatter.server import JSONAnswer, client_ip, error_response, read_body, read_json
from darkmatter.storage import Storage
from darkmatter.tools import Session, Tool, ToolError, boolean, integer, string
from darkmatter.wire import (FRESH_SECONDS, MAX_BODY, MAX_ID, ProtocolError, bad, check_content, check_id,
                             check_message_id, check_metadata, cj, classify, endpoint, forbidden, h, host_of,
                             is_fresh, is_loopback_host, is_self_certifying, literal_class, loads_object,
                             loads_strict, new_message_id, normalize, now_iso, parse_ts)

__all__ = [
    # markers and versions
    "hookimpl", "__version__", "PROTOCOL_VERSION",
    # the node, its settings and its plugins
    "Node", "StartupError", "Config", "ConfigError", "PLUGIN_GROUP", "active_plugins",
    # MCP tools
    "Tool", "ToolError", "Session", "string", "integer", "boolean",
    # transports: the interface, the inbound entry, outbound dispatch
    "Transport", "Reply", "TransportUnavailable", "Blocked", "Caller", "SMALL", "LARGE",
    "handle", "ROUTES", "route_of", "REFUSED_WHEN_INACTIVE", "inactive_check", "rate_key",
    "call", "check", "deliver",
    # bridges from outside the mesh (e.g. A2A): their messages enter the inbox through external_message
    "external_message",
    # discovery and storage
    "DiscoverySource", "Storage",
    # mesh operations (what the agent's tools do) and healing (docs/protocol.md §6)
    "request_connection", "respond_connection", "disconnect", "send_message", "forward_message",
    "respond_message", "expire_message", "ask_impression", "fetch_well_known", "recover",
    "broadcast_peer_update", "agent_url_for", "known_03", "mark_03",
    # HTTP route helpers (for plugins that serve routes on the node's port)
    "read_json", "read_body", "error_response", "JSONAnswer", "client_ip",
    # identity and signatures (docs/protocol.md §3)
    "Identity", "verify", "v1_string", "v2_string", "v2_message", "v2_webhook_update", "v2_beacon",
    "peer_update_string",
    # wire rules (docs/protocol.md §2, §7.3)
    "ProtocolError", "bad", "forbidden", "MAX_BODY", "MAX_ID", "FRESH_SECONDS", "now_iso", "is_fresh",
    "parse_ts", "check_id", "check_message_id", "is_self_certifying", "new_message_id", "endpoint",
    "normalize", "host_of", "is_loopback_host", "loads_object", "loads_strict", "h", "cj", "check_content",
    "check_metadata", "classify",
    "literal_class",
    # the control plane for people and other clients on the node's port (docs/protocol.md §12)
    "live_status", "check_control_request",
    # sessions of agents spawned for one message (docs/protocol.md §12.6)
    "grant_session_scope", "revoke_session_scope", "SESSION_ENV", "SPAWNED_AGENT_TOOLS",
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
