"""The DarkMatter operator console: see and steer a node from a browser at ``/ui`` on the node's port.

The mesh as a graph, pending connection requests, the inbox, sent messages with their routes, plugins,
settings and the live status, updated live through server-sent events. Actions (connect, accept, reject,
send, respond, forward, ...) call the kernel's own operations. See README.md.
"""

from __future__ import annotations

from darkmatter import hookimpl


@hookimpl
def dm_register_routes(register, node):
    from darkmatter_console.console import Console

    for route in Console(node).routes():
        register(route)
