"""The DarkMatter mesh protocol over HTTP: the mesh routes, the HTTP transport and mesh upkeep.

Routes map docs/protocol.md §4 endpoints onto the kernel's one inbound entry (``darkmatter.api.handle``);
the transport carries every outbound request and envelope with one pooled client that applies the §7.3
address policy; the lifespan runs the health loop (§6.4), address-change detection (§6.5) and the optional
UPnP mapping (§6.6), and closes the client at shutdown.
"""

from __future__ import annotations

import contextlib

from darkmatter.api import hookimpl

from darkmatter_http_transport.routes import build_routes
from darkmatter_http_transport.transport import HttpTransport
from darkmatter_http_transport.upkeep import lifespan


@hookimpl
def dm_register_routes(register, node):
    for route in build_routes(node):
        register(route)


def transport_of(node) -> HttpTransport:
    return node.plugin_state("http_transport", lambda: HttpTransport(node))


@hookimpl
def dm_register_transports(register, node):
    register(transport_of(node))


@contextlib.asynccontextmanager
async def client_lifespan(node):
    transport = transport_of(node)  # the client itself is made at the first outbound request
    try:
        yield
    finally:
        await transport.aclose()


@hookimpl
def dm_lifespan(node):
    @contextlib.asynccontextmanager
    async def composed():
        async with client_lifespan(node), lifespan(node):
            yield
    return composed()


@hookimpl
def dm_status_lines(node):
    failing = [c for c in node.connections.values() if (c.get("health_failures") or 0) >= 3]
    if failing:
        return [f"ACTION: {len(failing)} connection(s) unreachable after 3 health checks; "
                "see darkmatter_list_connections (mesh healing is retrying)."]
    return None
