"""Outbound dispatch: the kernel's only way out to the mesh (STYLE §4).

``call`` carries a request to a URL through the first transport (by priority) that handles the URL;
``deliver`` carries an envelope to a connection through the first transport whose ``can_send`` is true,
falling back on ``TransportUnavailable``; ``check`` asks the URL's transport whether it may be used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from darkmatter.mesh.transport import LARGE, Blocked, Reply, Transport, TransportUnavailable
from darkmatter.wire import cj

if TYPE_CHECKING:
    from darkmatter.node import Node


def transport_for(node: Node, url: Any) -> Transport | None:
    if not isinstance(url, str):
        return None
    for transport in node.transports:
        if transport.handles(url):
            return transport
    return None


def no_transport(url: Any) -> str:
    scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url else "?"
    return f"no transport of this node reaches {scheme}: URLs"


async def call(node: Node, method: str, url: str, *, body: Any = None, headers: dict | None = None,
               timeout: float = 15.0, max_bytes: int = LARGE, strict: bool = False) -> Reply:
    """One request to ``url``; never raises for network or peer faults (they come back in the Reply)."""
    transport = transport_for(node, url)
    if transport is None:
        return Reply(None, error=no_transport(url), error_kind="blocked")
    reply = await transport.request(method, url, json_body=body, headers=headers, timeout=timeout,
                                    max_bytes=max_bytes, strict=strict)
    reply.transport = transport.name
    return reply


async def check(node: Node, url: str, strict: bool = True) -> str | None:
    """Why ``url`` must not be used (docs/protocol.md §7), or None."""
    transport = transport_for(node, url)
    if transport is None:
        return no_transport(url)
    try:
        await transport.check(url, strict)
    except Blocked as exc:
        return str(exc)
    return None


async def deliver(node: Node, conn: dict, path: str, body: dict) -> Reply:
    """An envelope to a connection: transports in priority order, falling back on TransportUnavailable."""
    size = len(cj(body).encode("utf-8"))
    last: Reply | None = None
    for transport in node.transports:
        try:
            if not transport.can_send(conn, size):
                continue
            reply = await transport.send(conn, path, body)
            reply.transport = transport.name
            return reply
        except TransportUnavailable as exc:
            last = Reply(None, error=str(exc) or f"{transport.name} unavailable", error_kind="connect",
                         transport=transport.name)
            continue
    return last or Reply(None, error=no_transport(conn.get("agent_url")), error_kind="invalid")
