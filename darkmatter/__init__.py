"""DarkMatter: a node of the agent mesh.

Plugins import ``hookimpl`` from here::

    from darkmatter import hookimpl

    @hookimpl
    def dm_register_tools(register, node):
        ...
"""

import pluggy

__version__ = "0.3.0"
PROTOCOL_VERSION = "0.3"

hookimpl = pluggy.HookimplMarker("darkmatter")

__all__ = ["hookimpl", "__version__", "PROTOCOL_VERSION"]
