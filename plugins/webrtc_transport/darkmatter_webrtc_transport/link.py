"""One WebRTC peer connection to one DarkMatter connection, and the frames of docs/protocol.md §9.2.

A :class:`Link` wraps an aiortc ``RTCPeerConnection`` and its ``darkmatter`` data channel. It reports to
its manager (the WebRTC transport) when the channel opens, when a frame arrives and when the channel is
lost; it holds the futures of the frames it sent that still wait for an ack. aiortc objects are only
touched through duck typing here, so this module never imports aiortc.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from darkmatter_webrtc_transport.transport import WebRTCTransport

log = logging.getLogger(__name__)

LABEL = "darkmatter"
MESSAGE_PATH = "/__darkmatter__/message"
ACK_PATH = "/__darkmatter__/ack"
MAX_FRAME = 16384  # §9.3: larger frames go over HTTP
FRAME_CONCURRENCY = 16


def dumps(value: Any) -> str:
    """Compact JSON text as UTF-8 frames carry it (same length as ``CJ`` of the same value)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def new_frame_id() -> str:
    return secrets.token_hex(16)


def frame_overhead(path: str = MESSAGE_PATH) -> int:
    """Bytes a message frame adds around its payload (the kernel's ``size`` counts the payload only)."""
    return len(dumps({"path": path, "payload": {}, "frame_id": "0" * 32}).encode("utf-8")) - 2


class Link:
    """A peer connection with one data channel labelled ``darkmatter``, ordered and reliable."""

    def __init__(self, manager: WebRTCTransport, agent_id: str, pc: Any, *, offerer: bool):
        self.manager = manager
        self.agent_id = agent_id
        self.pc = pc
        self.offerer = offerer
        self.channel: Any = None
        self.gathering: asyncio.Future | None = None
        self.opened = asyncio.Event()
        self.pending: dict[str, asyncio.Future] = {}
        self.lost = False
        self.closing = False
        self.created = time.monotonic()
        self.frames_in = 0
        self.frames_out = 0
        self._sem = asyncio.Semaphore(FRAME_CONCURRENCY)
        pc.on("connectionstatechange", self._on_state)

    # --- aiortc events -------------------------------------------------------------------------

    def attach(self, channel: Any) -> None:
        self.channel = channel
        channel.on("open", self._on_open)
        channel.on("close", lambda: self.manager.lost(self, "data channel closed"))
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._on_open()

    def on_datachannel(self, channel: Any) -> None:
        """Answerer side: the offerer opened its channel."""
        if channel.label != LABEL or self.channel is not None:
            log.info("ignoring data channel %r from %s", str(channel.label)[:32], self.agent_id[:16])
            channel.close()
            return
        self.attach(channel)

    def _on_open(self) -> None:
        if self.opened.is_set() or self.lost:
            return
        self.opened.set()
        self.manager.install(self)

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state in ("failed", "closed"):
            self.manager.lost(self, f"peer connection {state}")

    def _on_message(self, data: Any) -> None:
        if not isinstance(data, str):
            log.info("ignoring a binary frame from %s", self.agent_id[:16])
            return
        self.frames_in += 1
        self.manager.node.spawn(self.manager.handle_frame(self, data), name="webrtc-frame")

    # --- use -------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return (not self.lost and not self.closing and self.channel is not None
                and self.channel.readyState == "open")

    @property
    def slot(self) -> asyncio.Semaphore:
        return self._sem

    def send_text(self, text: str) -> None:
        """Queue one frame on the channel; raises if the channel is not open."""
        if not self.is_open:
            raise ConnectionError("data channel is not open")
        self.channel.send(text)
        self.frames_out += 1

    def remote_ip(self) -> str:
        """An address the peer announced as an ICE candidate (informational: Caller.ip)."""
        try:
            candidates = self.pc.sctp.transport.transport.getRemoteCandidates()
        except AttributeError:
            return ""
        return str(candidates[0].ip) if candidates else ""

    def fail_pending(self, reason: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError(reason))
        self.pending.clear()

    async def gather(self, description: Any, timeout: float) -> bool:
        """``setLocalDescription`` (aiortc gathers the ICE candidates in it), for at most ``timeout`` s.

        Returns False on timeout. NOTE: the gathering is left to finish in the background rather than
        cancelled: cancelling it orphans aioice's STUN transactions, which then fire on closed sockets.
        aioice bounds its own STUN queries (5 s), and ``close`` waits for them before closing.
        """
        self.gathering = asyncio.ensure_future(self.pc.setLocalDescription(description))
        done, _ = await asyncio.wait({self.gathering}, timeout=timeout)
        if not done:
            return False
        self.gathering.result()
        return True

    async def close(self, timeout: float = 5.0, *, defer: bool = True) -> None:
        """Close the peer connection. With gathering still running, the close happens in the background
        once it ends (``defer``), so no caller ever waits for a slow STUN server."""
        if self.closing:
            return
        self.closing = True
        self.manager.lost(self, "closed locally")
        if defer and self.gathering is not None and not self.gathering.done():
            self.manager.node.spawn(self._close_after_gathering(timeout), name="webrtc-close")
            return
        await self._close_pc(timeout)

    async def _close_after_gathering(self, timeout: float) -> None:
        try:
            await asyncio.wait({self.gathering}, timeout=30.0)
        finally:
            if self.gathering.done() and not self.gathering.cancelled():
                self.gathering.exception()  # retrieved: a failed late gathering is of no interest now
            await self._close_pc(timeout)

    async def _close_pc(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.pc.close(), timeout)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - closing must never raise
            log.debug("closing the peer connection to %s: %r", self.agent_id[:16], exc)
