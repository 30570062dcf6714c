"""The DarkMatter mesh protocol over HTTP: the mesh routes, the HTTP transport and mesh upkeep.

Routes map docs/protocol.md §4 endpoints onto the kernel's transport-neutral handlers (``darkmatter.mesh``);
the transport carries ``/message`` envelopes to connections with the node's pooled client; the lifespan
runs the health loop (§6.4), address-change detection (§6.5) and the optional UPnP mapping (§6.6).
"""

from __future__ import annotations

from darkmatter import hookimpl

from darkmatter_http_transport.routes import build_routes
from darkmatter_http_transport.transport import HttpTransport
from darkmatter_http_transport.upkeep import lifespan


@hookimpl
def dm_register_routes(register, node):
    for route in build_routes(node):
        register(route)


@hookimpl
def dm_register_transports(register, node):
    register(HttpTransport(node))


@hookimpl
def dm_lifespan(node):
    return lifespan(node)


@hookimpl
def dm_status_lines(node):
    failing = [c for c in node.connections.values() if (c.get("health_failures") or 0) >= 3]
    if failing:
        return [f"ACTION: {len(failing)} connection(s) unreachable after 3 health checks; "
                "see darkmatter_list_connections (mesh healing is retrying)."]
    return None
