"""Self-replication (docs/protocol.md §4.11): a node hands out everything a new machine needs to join
the mesh. ``/bootstrap`` (a POSIX shell script), ``/bootstrap/server.py`` (the same in stdlib-only
Python) and ``/bootstrap/packages/{file}`` (wheels of the kernel and of every plugin the node runs), and
the ``darkmatter_get_server_template`` tool. ``DARKMATTER_BOOTSTRAP=false`` leaves the routes out (404)
and skips packaging; the tool then says so.
"""

from __future__ import annotations

from darkmatter import hookimpl

from darkmatter_bootstrap import service, template


@hookimpl
def dm_register_routes(register, node):
    if node.config.bootstrap:
        for route in service.build_routes(node):
            register(route)


@hookimpl
def dm_register_tools(register, node):
    register(template.server_template_tool())


@hookimpl
def dm_lifespan(node):
    return service.lifespan(node)
