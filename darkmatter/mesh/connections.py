"""What inbound and outbound mesh code share: caps, connection records, protocol versions, notices,
and the rule that a change is durable before it is acknowledged (docs/protocol.md §4, §11.2)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

from darkmatter import PROTOCOL_VERSION
from darkmatter.mesh.transport import Caller, Reply
from darkmatter.wire import (MAX_BIO, MAX_NAME, MAX_NOTE, SCHEMES, ProtocolError, normalize, now_iso, origin_key,
                             truncate, valid_host_header)

if TYPE_CHECKING:
    from darkmatter.node import Node

MAX_CONNECTIONS = 50
MAX_PENDING_IN = 50
MAX_PENDING_OUT = 50
PENDING_TTL = 7 * 24 * 3600
HOPS_CAP = 50


def version_at_least(version: Any, minimum: str = "0.3") -> bool:
    have, want = _version(str(version)), _version(minimum)
    return have is not None and want is not None and have >= want


@functools.lru_cache(maxsize=256)
def _version(text: str) -> tuple[int, ...] | None:
    # NOTE: cached: every accepted message asks this of its sender's connection (mark_03)
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return None


def known_03(conn: dict | None) -> bool:
    return bool(conn) and (version_at_least(conn.get("protocol_version")) or bool(conn.get("known_03")))


def mark_03(conn: dict) -> None:
    conn["known_03"] = True
    if not version_at_least(conn.get("protocol_version")):
        conn["protocol_version"] = conn.get("protocol_version") or PROTOCOL_VERSION


def inactive_check(node: Node) -> None:
    if not node.is_active:
        raise ProtocolError(503, "inactive", "Agent is currently inactive")


def save_failed() -> ProtocolError:
    return ProtocolError(503, "unavailable", "This node cannot save its state right now (is its disk full or "
                                             "read-only?); nothing was recorded. Try again later.")


async def persist(node: Node, undo: Callable[[], None], ops: list | None = None) -> None:
    """Make a change durable before it is acknowledged (§11.2). When the state cannot be written (disk full,
    read-only), undo the change and answer 503: a retry is then handled afresh, never as a duplicate of
    something that only ever existed in memory."""
    try:
        await (node.save(ops) if ops is not None else node.save())
    except OSError:
        undo()
        raise save_failed() from None


def agent_url_for(node: Node, caller: Caller) -> str:
    """§4.2: the URL we tell a requester, built from the Host header it used."""
    host = caller.host
    if not valid_host_header(host):
        return node.base_url
    scheme = caller.headers.get("x-forwarded-proto", "").lower()
    if scheme not in ("http", "https"):
        scheme = caller.scheme if caller.scheme in SCHEMES else "http"
    try:
        url = normalize(f"{scheme}://{host}")
    except ProtocolError:
        return node.base_url
    public = node.config.public_url
    if public:
        try:
            if origin_key(public)[1:3] == origin_key(url)[1:3]:
                return public
        except ProtocolError:
            pass
    return url


def accept_body(node: Node, requester_id: str, agent_url: str) -> dict:
    ts = now_iso()
    body = {"auto_accepted": True, "agent_id": node.agent_id, "agent_url": agent_url,
            "agent_bio": node.state.get("bio"), "agent_public_key_hex": node.public_key_hex,
            "agent_display_name": node.state.get("display_name"), "protocol_version": PROTOCOL_VERSION,
            "timestamp": ts}
    body["signature_v2_hex"] = node.sign_v2("connection_accepted", node.agent_id, agent_url,
                                            node.public_key_hex, requester_id, ts)
    return body


def new_connection(agent_id: str, url: str, key: str | None, direction: str, *, bio: Any = None,
                   display_name: Any = None, self_url: str | None = None, version: Any = None) -> dict:
    return {"agent_id": agent_id, "agent_url": url, "agent_bio": truncate(bio, MAX_BIO),
            "direction": direction, "connected_at": now_iso(), "messages_sent": 0, "messages_received": 0,
            "messages_declined": 0, "total_response_time_ms": 0, "last_activity": now_iso(),
            "agent_public_key_hex": key, "agent_display_name": truncate(display_name, MAX_NAME) or None,
            "self_url": self_url, "protocol_version": version if isinstance(version, str) else None,
            "health_failures": 0, "last_peer_update_ts": None, "known_03": version_at_least(version)}


def add_notice(node: Node, kind: str, agent_id: str, text: str) -> None:
    notices = node.state["notices"]
    notices.append({"type": kind, "agent_id": agent_id, "text": text[:MAX_NOTE], "at": now_iso()})
    del notices[:-50]


def drop_connection(node: Node, agent_id: str) -> dict | None:
    """Remove a connection, failing its queued message and forward deliveries (§4.6)."""
    conn = node.connections.pop(agent_id, None)
    for entry in list(node.state["outbox"]):
        if entry["kind"] in ("message", "forward") and entry.get("target_agent_id") == agent_id:
            node.outbox.finish(entry, "failed", Reply(None, error="connection removed"))
    return conn
