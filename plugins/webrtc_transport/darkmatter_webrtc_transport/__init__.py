"""WebRTC data channels between DarkMatter nodes, with HTTP fallback (docs/protocol.md §9).

Registers the ``webrtc`` transport (priority 10, above ``http``), the signed
``POST /__darkmatter__/webrtc_offer`` route and the ``darkmatter_upgrade_webrtc`` tool. aiortc is imported
lazily, at the first upgrade or offer and off the event loop; without it the route answers 501 and the tool
says WebRTC is unavailable.
"""

from __future__ import annotations

import contextlib

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from darkmatter.api import ProtocolError, Tool, ToolError, error_response, hookimpl, read_json, string

from darkmatter_webrtc_transport import signalling
from darkmatter_webrtc_transport.transport import NAME, WebRTCTransport

OFFER_PATH = "/__darkmatter__/webrtc_offer"
MAX_STATUS_PEERS = 10


def transport_of(node) -> WebRTCTransport:
    """This node's WebRTC transport (it also holds the plugin's per-node state)."""
    for transport in node.transports:
        if isinstance(transport, WebRTCTransport):
            return transport
    raise LookupError("webrtc_transport is not registered on this node")


@hookimpl
def dm_register_transports(register, node):
    register(WebRTCTransport(node))


@hookimpl
def dm_register_routes(register, node):
    async def webrtc_offer(request: Request) -> JSONResponse:
        manager = transport_of(node)
        if await manager.rtc() is None:  # §9.1 check 1, before parsing
            return error_response(ProtocolError(501, "webrtc_unavailable", "WebRTC not available"))
        try:
            try:
                body = await read_json(request)
            except ProtocolError as exc:
                if exc.status != 400:
                    raise
                # §9.1 check 2: any bad body gets the 0.2 text (the code still says what was wrong)
                raise ProtocolError(400, exc.code, f"{signalling.BAD_BODY} ({exc.error})") from None
            return JSONResponse(await signalling.answer(manager, body))
        except ProtocolError as exc:
            return error_response(exc)

    register(Route(OFFER_PATH, webrtc_offer, methods=["POST"]))


@hookimpl
def dm_register_tools(register, node):
    async def upgrade(node, args: dict, session) -> dict:
        try:
            manager = transport_of(node)
        except LookupError as exc:
            raise ToolError(str(exc)) from None
        result = await signalling.upgrade(manager, args.get("agent_id"))
        # the original implementation's names (protocol 0.2) beside the new ones
        result.setdefault("already_upgraded", bool(result.get("already_open")))
        result.setdefault("display_name", (node.connections.get(result.get("agent_id")) or {}).get(
            "agent_display_name"))
        return result

    register(Tool(
        name="darkmatter_upgrade_webrtc",
        description=("Upgrade a connection to a WebRTC data channel (docs/protocol.md §9). Messages up to 16 KB "
                     "then travel over the channel; larger ones, and everything while the channel is closed, "
                     "still go over HTTP. darkmatter_list_connections shows each connection's transport."),
        handler=upgrade,
        properties={"agent_id": string("The connected agent to open a data channel to", min_length=1,
                                       max_length=128)},
        required=("agent_id",),
        idempotent=True,
        open_world=True,
        title="Upgrade connection to WebRTC",
    ))


@hookimpl
def dm_lifespan(node):
    @contextlib.asynccontextmanager
    async def lifespan():
        manager = transport_of(node)
        # A restart has no channel: whatever the state file says, every connection starts on HTTP.
        for conn in node.connections.values():
            conn["transport"] = "http"
        manager.running = True
        # NOTE: aiortc (with PyAV and its codecs) is loaded at the first upgrade or offer, off the event loop
        # (manager.rtc()), not at start: most nodes never open a data channel, and the import was a third of a
        # node's start-up and memory.
        try:
            yield
        finally:
            manager.running = False
            await manager.close_all()

    return lifespan()


@hookimpl
def dm_on_connection_changed(node, agent_id, event):
    if event == "connected" and agent_id in node.connections:
        node.connections[agent_id].setdefault("transport", "http")
    elif event == "disconnected":
        manager = transport_of(node)
        if agent_id in manager.links or agent_id in manager.negotiating:
            return manager.close(agent_id)
    return None


@hookimpl
def dm_status_lines(node):
    try:
        manager = transport_of(node)
    except LookupError:
        return None
    peers = manager.open_peers()
    if not peers:
        return None
    lines = []
    for agent_id in peers[:MAX_STATUS_PEERS]:
        conn = node.connections.get(agent_id) or {}
        name = "".join(c for c in str(conn.get("agent_display_name") or "")[:40] if c.isprintable() and c != '"')
        label = f'"{agent_id[:16]}"' + (f' ("{name}")' if name else "")
        lines.append(f"[{NAME}] {label}: WebRTC data channel open")
    if len(peers) > MAX_STATUS_PEERS:
        lines.append(f"[{NAME}] … and {len(peers) - MAX_STATUS_PEERS} more peer(s) on WebRTC")
    return lines
