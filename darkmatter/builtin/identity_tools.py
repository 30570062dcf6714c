"""The node's own identity and status tools: authenticate, get_identity, update_bio, set_status, status."""

from __future__ import annotations

import asyncio
import hmac
import re

from darkmatter import PROTOCOL_VERSION, __version__, hookimpl
from darkmatter.backup import BackupError, backup_path, write_backup
from darkmatter.identity import Identity
from darkmatter.tools import Tool, ToolError, boolean, string
from darkmatter.wire import MAX_BIO, MAX_NAME

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


async def authenticate(node, args: dict, session) -> dict:
    """§12.3: claim the node. The private key never leaves the node in a result: without arguments the node
    writes an identity backup file once (0600) and returns its path; with private_key_hex it checks the key."""
    given = args.get("private_key_hex")
    if given is not None:
        given = given.strip()
        if not _HEX64.match(given):
            raise ToolError("private_key_hex must be 64 hexadecimal characters (an Ed25519 seed).")
        derived = Identity.from_private_hex(given).public_key_hex
        if not hmac.compare_digest(derived, node.public_key_hex):
            raise ToolError("That private key does not belong to this node: it derives a different public key.")
        status = _claim(node)
        return {"authenticated": True, "success": True, "status": status, "agent_id": node.agent_id,
                "public_key_hex": node.public_key_hex}
    path = backup_path(node.config.state_file, node.config.env)
    try:
        created = await asyncio.to_thread(write_backup, path, node.identity)
    except BackupError as exc:
        raise ToolError(str(exc)) from None
    status = _claim(node)
    return {"authenticated": True, "success": True, "status": status, "agent_id": node.agent_id,
            "public_key_hex": node.public_key_hex, "identity_backup": str(path), "backup_created": created,
            "note": "The private key is never shown in a tool result. The backup file (mode 0600) holds it: keep "
                    "a copy somewhere safe; `darkmatter identity restore <file>` restores it on the command line."}


def _claim(node) -> str:
    """Mark the node claimed; the original's status word: ``claimed`` the first time, else ``authenticated``."""
    if node.state.get("claimed"):
        return "authenticated"
    node.state["claimed"] = True
    node.save_soon()
    return "claimed"


async def get_identity(node, args: dict, session) -> dict:
    state = node.state
    return {"agent_id": node.agent_id, "display_name": state.get("display_name"), "bio": state.get("bio"),
            "public_key_hex": node.public_key_hex, "status": state.get("status"),
            "is_genesis": bool(state.get("is_genesis")), "url": node.base_url, "port": node.port,
            "created_at": state.get("created_at"), "protocol_version": PROTOCOL_VERSION, "version": __version__,
            # the original's counters
            "num_connections": len(node.connections), "num_pending_requests": len(state.get("pending_requests") or {}),
            "messages_handled": state.get("messages_handled", 0), "message_queue_size": len(state.get("inbox") or []),
            "sent_messages_count": len(state.get("sent_messages") or {})}


async def update_bio(node, args: dict, session) -> dict:
    bio = args["bio"].strip()
    if not bio:
        raise ToolError("bio must not be blank: say what you can help with.")
    node.state["bio"] = bio[:MAX_BIO]
    name = args.get("display_name")
    if name is not None:
        name = " ".join(name.split())
        if not name:
            raise ToolError("display_name must not be blank (omit it to keep the current one).")
        node.state["display_name"] = name[:MAX_NAME]
    await node.save()
    node.changed()
    return {"success": True, "updated": True, "bio": node.state["bio"], "display_name": node.state.get("display_name")}


async def set_status(node, args: dict, session) -> dict:
    status = args["status"]
    previous = node.state.get("status")
    node.state["status"] = status
    await node.save()
    if previous != status:
        node.changed()
    note = ("Peers can connect and send you messages." if status == "active" else
            "Peers get 503 'Agent is currently inactive' for connection requests and messages until you "
            "set status=active.")
    return {"success": True, "status": status, "previous": previous, "note": note}


async def status(node, args: dict, session) -> dict:
    from darkmatter.mcp import live_status

    state = node.state
    lines = live_status(node)
    result = {
        "agent_id": node.agent_id, "display_name": state.get("display_name"), "status": state.get("status"),
        "url": node.base_url, "port": node.port, "protocol_version": PROTOCOL_VERSION, "version": __version__,
        "connections": len(node.connections), "inbox": len(state.get("inbox") or []),
        "pending_requests": len(state.get("pending_requests") or {}),
        "sent_messages": len(state.get("sent_messages") or {}), "outbox": len(state.get("outbox") or []),
        "discovered_peers": len(node.discovered), "plugins": node.plugin_list(),
        "summary": lines[0], "actions": [line for line in lines if line.startswith("ACTION:")],
        "notes": [line for line in lines[1:] if not line.startswith("ACTION:")],
    }
    mcp = getattr(node, "mcp", None)
    if mcp is not None:
        result["mcp_sessions"] = mcp.sessions()
    if args.get("include_notices"):
        result["notices"] = list(state.get("notices") or [])[-20:]
    return result


@hookimpl
def dm_register_tools(register, node):
    register(Tool(
        name="darkmatter_authenticate", title="Authenticate as this agent",
        description=("Claim this node as its owner. Without arguments, writes a backup of the agent's identity "
                     "to a private file (mode 0600, once) and returns its path: the private key itself is never "
                     "returned. With private_key_hex, verifies that the key is this node's own and fails "
                     "otherwise."),
        handler=authenticate,
        properties={"private_key_hex": string("A private key (64 hex characters) to verify against this node's "
                                              "identity. Omit to write the identity backup file.",
                                              min_length=64, max_length=64)},
        read_only=False, destructive=False, idempotent=True, open_world=False))
    register(Tool(
        name="darkmatter_get_identity", title="Get this agent's identity",
        description="Return this agent's id, display name, bio, public key, status, URL and protocol version.",
        handler=get_identity, read_only=True, idempotent=True))
    register(Tool(
        name="darkmatter_update_bio", title="Update bio",
        description=("Set the bio peers see when they connect or route messages: what you are, what you know and "
                     "what you can help with. Optionally set the display name too."),
        handler=update_bio,
        properties={"bio": string("The new bio (plain text).", min_length=1, max_length=MAX_BIO),
                    "display_name": string("A new display name; omit to keep the current one.", min_length=1,
                                           max_length=MAX_NAME)},
        required=("bio",), read_only=False, destructive=True, idempotent=True))
    register(Tool(
        name="darkmatter_set_status", title="Set active or inactive",
        description=("Go inactive to stop accepting connection requests and messages (peers get 503), or "
                     "active to accept them again. Restarting the node makes it active."),
        handler=set_status,
        properties={"status": string("active or inactive.", enum=["active", "inactive"])},
        required=("status",), read_only=False, destructive=True, idempotent=True))
    register(Tool(
        name="darkmatter_status", title="Live status",
        description=("Show this node's status: identity, connections, inbox, pending requests, active plugins and "
                     "what needs your attention. This description itself always carries the live status."),
        handler=status,
        properties={"include_notices": boolean("Also return the latest notices (rejections, disconnects).",
                                               default=False)},
        read_only=True, idempotent=True))
