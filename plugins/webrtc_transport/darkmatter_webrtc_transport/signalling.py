"""WebRTC signalling over the existing HTTP connection (docs/protocol.md §9.1).

``upgrade`` is the offerer (the ``darkmatter_upgrade_webrtc`` tool): gather (non-trickle, ≤ 10 s), POST a
v2-signed ``webrtc_offer``, verify the answer, and wait ≤ 15 s for the channel to open. ``answer`` is the
answerer behind ``POST /__darkmatter__/webrtc_offer``: the §9.1 checks in order, then an answer signed as
``webrtc_answer``. A refused offer never touches an open channel, and an accepted one replaces the old
channel only once the new one is open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from darkmatter.api import (ProtocolError, ToolError, call, check_id, endpoint, forbidden, h, is_fresh,
                            is_self_certifying, known_03, mark_03, now_iso, v2_string, verify)

from darkmatter_webrtc_transport.link import LABEL, Link

if TYPE_CHECKING:
    from darkmatter_webrtc_transport.transport import WebRTCTransport

log = logging.getLogger(__name__)

MAX_SDP = 64 * 1024
OFFER_TIMEOUT = 30.0  # §13.3
BAD_BODY = "Missing from_agent_id or sdp_offer"


def has_candidates(sdp: str) -> bool:
    return any(line.startswith("a=candidate:") for line in sdp.splitlines())


def has_datachannel(sdp: str) -> bool:
    return any(line.startswith("m=application") and "webrtc-datachannel" in line for line in sdp.splitlines())


def _short(agent_id: str) -> str:
    return agent_id[:16]


# --- offerer ---------------------------------------------------------------------------------------


async def upgrade(manager: WebRTCTransport, agent_id: Any) -> dict:
    """Open a data channel to a connection. Returns the tool result or raises ToolError."""
    node = manager.node
    if not isinstance(agent_id, str) or not agent_id:
        raise ToolError("agent_id must be a non-empty string (see darkmatter_list_connections).")
    rtc = await manager.rtc()
    if rtc is None:
        raise ToolError("WebRTC is unavailable on this node: aiortc cannot be imported (pip install aiortc). "
                        "The connection keeps using HTTP.")
    if agent_id not in node.connections:
        raise ToolError(f"Not connected to {agent_id[:128]!r}. See darkmatter_list_connections.")
    async with manager.lock_for(agent_id):
        existing = manager.links.get(agent_id)
        if existing is not None and existing.is_open:
            return {"success": True, "agent_id": agent_id, "transport": "webrtc", "already_open": True,
                    "message": "A WebRTC data channel to this agent is already open."}
        conn = node.connections.get(agent_id)
        if conn is None:
            raise ToolError(f"Not connected to {agent_id[:128]!r}. See darkmatter_list_connections.")
        pc = rtc.RTCPeerConnection(manager.rtc_configuration(rtc))
        link = Link(manager, agent_id, pc, offerer=True)
        try:
            link.attach(pc.createDataChannel(LABEL, ordered=True))
            await _open_as_offerer(manager, rtc, link, conn)
        except BaseException:
            await link.close()
            raise
    return {"success": True, "agent_id": agent_id, "transport": "webrtc", "already_open": False,
            "message": "WebRTC data channel open; messages up to 16 KB now travel over it, larger ones over HTTP."}


async def _open_as_offerer(manager: WebRTCTransport, rtc: Any, link: Link, conn: dict) -> None:
    node = manager.node
    pc = link.pc
    agent_id = link.agent_id
    try:
        gathered = await link.gather(await pc.createOffer(), manager.gather_timeout)
    except Exception as exc:  # noqa: BLE001 - aiortc/aioice failures become a message for the agent
        raise ToolError(f"ICE gathering failed ({type(exc).__name__}: {str(exc)[:200]}). "
                        "The connection keeps using HTTP.") from None
    if not gathered:
        raise ToolError(f"ICE gathering did not finish within {manager.gather_timeout:.0f} s (are the "
                        "DARKMATTER_STUN_SERVERS reachable?). The connection keeps using HTTP.")
    sdp = pc.localDescription.sdp
    if not has_candidates(sdp):
        raise ToolError("No ICE candidates: this host has no usable address for WebRTC (aiortc never offers "
                        "127.0.0.1). The connection keeps using HTTP.")
    ts = now_iso()
    body = {"from_agent_id": node.agent_id, "to_agent_id": agent_id, "sdp_offer": sdp, "timestamp": ts,
            "signature_v2_hex": node.sign_v2("webrtc_offer", node.agent_id, agent_id, ts, h(sdp))}
    reply = await call(node, "POST", endpoint(conn["agent_url"], "webrtc_offer"), body=body, timeout=OFFER_TIMEOUT,
                       max_bytes=4 * MAX_SDP)
    if not reply.ok:
        hint = " (the peer has no WebRTC support)" if reply.status in (404, 501) else ""
        raise ToolError(f"{_short(agent_id)} did not accept the WebRTC offer: {reply.describe()}{hint}. "
                        "The connection keeps using HTTP.")
    answer = verify_answer(node, conn, reply.body)
    try:
        await pc.setRemoteDescription(rtc.RTCSessionDescription(sdp=answer, type="answer"))
    except Exception as exc:  # noqa: BLE001 - a malformed answer from the peer
        raise ToolError(f"{_short(agent_id)} sent an unusable SDP answer ({type(exc).__name__}). "
                        "The connection keeps using HTTP.") from None
    try:
        await asyncio.wait_for(link.opened.wait(), manager.open_timeout)
    except asyncio.TimeoutError:
        raise ToolError(f"The data channel did not open within {manager.open_timeout:.0f} s (no ICE path "
                        "between the two hosts?). The connection keeps using HTTP.") from None
    if link.lost or manager.links.get(agent_id) is not link:
        raise ToolError("The data channel closed right after opening. The connection keeps using HTTP.")


def verify_answer(node, conn: dict, body: dict) -> str:
    """§9.1: verify a signed answer; accept an unsigned one only from a peer not known to be 0.3."""
    agent_id = conn["agent_id"]
    sdp = body.get("sdp_answer")
    if not isinstance(sdp, str) or not sdp or len(sdp) > MAX_SDP:
        raise ToolError(f"{_short(agent_id)} answered without a usable sdp_answer.")
    signature = body.get("signature_v2_hex")
    timestamp = body.get("timestamp")
    key = node.key_of(agent_id)
    if signature not in (None, "") and key is not None:
        text = v2_string("webrtc_answer", agent_id, node.agent_id, timestamp, h(sdp))
        if not isinstance(timestamp, str) or not is_fresh(timestamp):
            raise ToolError(f"Refused the WebRTC answer of {_short(agent_id)}: stale or missing timestamp.")
        if not isinstance(signature, str) or not verify(key, text, signature):
            raise ToolError(f"Refused the WebRTC answer of {_short(agent_id)}: invalid signature.")
        mark_03(conn)
        return sdp
    if signature in (None, "") and (known_03(conn) or is_self_certifying(agent_id)):
        raise ToolError(f"Refused the WebRTC answer of {_short(agent_id)}: a 0.3 peer must sign it.")
    return sdp  # a legacy peer: unsigned, or keyless so nothing to verify with


# --- answerer --------------------------------------------------------------------------------------


async def answer(manager: WebRTCTransport, body: dict) -> dict:
    """The §9.1 checks 2–6 and the answer; raises ProtocolError. (Check 1, 501, is the route's.)"""
    node = manager.node
    from_id = body.get("from_agent_id")
    sdp = body.get("sdp_offer")
    if not isinstance(from_id, str) or not from_id or not isinstance(sdp, str) or not sdp:
        raise ProtocolError(400, "missing_fields", BAD_BODY)
    check_id(from_id, "from_agent_id")
    if len(sdp) > MAX_SDP:
        raise ProtocolError(400, "invalid_field", f"Field 'sdp_offer' is longer than {MAX_SDP} characters")
    conn = node.connections.get(from_id)
    if conn is None:
        raise forbidden("Not connected — WebRTC upgrade requires an existing connection.", "not_connected")
    key = node.key_of(from_id)
    if key is None:
        # NOTE: an unsigned offer for a keyless connection could come from anyone claiming its id and would
        # replace its channel; without a key nothing can prove who offers, so the upgrade is refused.
        raise forbidden("WebRTC upgrade requires a connection with a key: a keyless connection's offers cannot "
                        "be verified", "signature_required")
    check_offer_signature(node, key, from_id, sdp, body)
    if not manager.first_sight(body["signature_v2_hex"]):
        raise forbidden("Replayed WebRTC offer: this signed offer was already received", "stale_timestamp")
    mark_03(conn)
    node.rate.check("webrtc_offer", from_id)
    if not has_datachannel(sdp):
        raise ProtocolError(400, "invalid_field", "Invalid sdp_offer: no data channel section")
    rtc = await manager.rtc()
    if rtc is None:
        raise ProtocolError(501, "webrtc_unavailable", "WebRTC not available")
    pc = rtc.RTCPeerConnection(manager.rtc_configuration(rtc))
    link = Link(manager, from_id, pc, offerer=False)
    pc.on("datachannel", link.on_datachannel)
    try:
        try:
            await pc.setRemoteDescription(rtc.RTCSessionDescription(sdp=sdp, type="offer"))
            local = await pc.createAnswer()
        except Exception:  # noqa: BLE001 - aiortc raises many kinds of errors on a bad SDP
            raise ProtocolError(400, "invalid_field", "Invalid sdp_offer") from None
        try:
            gathered = await link.gather(local, manager.gather_timeout)
        except Exception:  # noqa: BLE001
            raise ProtocolError(400, "invalid_field", "Invalid sdp_offer") from None
        if not gathered:
            raise ProtocolError(503, "unavailable", f"ICE gathering took longer than "
                                                    f"{manager.gather_timeout:.0f} s")
    except BaseException:
        await link.close()
        raise
    sdp_answer = pc.localDescription.sdp
    previous = manager.negotiating.get(from_id)
    manager.negotiating[from_id] = link
    if previous is not None:
        node.spawn(previous.close(), name="webrtc-close")
    node.spawn(_expire_unopened(manager, link), name="webrtc-open-wait")
    ts = now_iso()
    return {"success": True, "sdp_answer": sdp_answer, "timestamp": ts,
            "signature_v2_hex": node.sign_v2("webrtc_answer", node.agent_id, from_id, ts, h(sdp_answer))}


def check_offer_signature(node, key: str, from_id: str, sdp: str, body: dict) -> None:
    """§9.1 check 4: signature_required / stale_timestamp / invalid_signature, verified with to = self."""
    signature = body.get("signature_v2_hex")
    timestamp = body.get("timestamp")
    if signature in (None, ""):
        raise forbidden("Signature required: this connection has a key, so its WebRTC offers must be signed",
                        "signature_required")
    if not isinstance(timestamp, str) or not is_fresh(timestamp):
        raise forbidden("Stale or missing timestamp", "stale_timestamp")
    to_id = body.get("to_agent_id")
    if to_id not in (None, node.agent_id):
        raise forbidden("Invalid signature: the offer is addressed to another agent", "invalid_signature")
    text = v2_string("webrtc_offer", from_id, node.agent_id, timestamp, h(sdp))
    if not isinstance(signature, str) or not verify(key, text, signature):
        raise forbidden("Invalid signature", "invalid_signature")


async def _expire_unopened(manager: WebRTCTransport, link: Link) -> None:
    """An answered offer whose channel does not open within 15 s is dropped (the old channel stays)."""
    try:
        await asyncio.wait_for(link.opened.wait(), manager.open_timeout)
    except asyncio.TimeoutError:
        log.info("WebRTC channel from %s did not open within %.0f s", _short(link.agent_id), manager.open_timeout)
        await link.close()
