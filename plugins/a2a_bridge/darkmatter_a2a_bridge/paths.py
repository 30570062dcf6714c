"""Where the bridge lives on the node's port, and the inbox transport name of its messages (no SDK import:
the plugin's entry module registers its routes with these before the SDK is loaded)."""

MOUNT = "/a2a"  # everything A2A but the card lives under this path
JSONRPC_SUBPATH = "/jsonrpc"
REST_SUBPATH = "/rest"
JSONRPC_PATH = MOUNT + JSONRPC_SUBPATH
REST_PATH = MOUNT + REST_SUBPATH
CARD_PATH = "/.well-known/agent-card.json"
LEGACY_CARD_PATH = "/.well-known/agent.json"
TRANSPORT = "a2a"  # the ``transport`` of an inbox entry that came over A2A
