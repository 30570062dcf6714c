"""The ``webrtc`` transport (docs/protocol.md §9.2, §9.3): /message envelopes over an open data channel.

The kernel asks ``can_send(connection, size)`` and then ``send``; this transport takes an envelope only
when the peer's channel is open and the frame fits in 16 384 UTF-8 bytes, else the kernel uses HTTP.
To a known-0.3 peer it waits up to 10 s for the ack frame and returns the status and body the HTTP
request would have produced; with no ack (or when the channel closes first) it raises
``TransportUnavailable`` so the kernel resends over HTTP at once (deduplication, §3.7, makes the
resend safe). To a 0.2 peer frames are fire-and-forget: ``delivered`` with ``acknowledged: false``.

The transport object also owns the plugin's per-node state: the open links, the offers still being
negotiated, and the connection's ``transport`` field shown by ``darkmatter_list_connections``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from typing import TYPE_CHECKING, Any

from darkmatter.api import (FRESH_SECONDS, MAX_BODY, Blocked, Caller, ConfigError, ProtocolError, Reply,
                            TransportUnavailable, forbidden, handle, known_03, loads_object)

from darkmatter_webrtc_transport.link import (ACK_PATH, MAX_FRAME, MESSAGE_PATH, Link, dumps, frame_overhead,
                                              new_frame_id)

if TYPE_CHECKING:
    from darkmatter.api import Node

log = logging.getLogger(__name__)

NAME = "webrtc"
PRIORITY = 10  # above http (0)
DEFAULT_STUN = "stun:stun.l.google.com:19302"
GATHER_TIMEOUT = 10.0
OPEN_TIMEOUT = 15.0
ACK_TIMEOUT = 10.0


def parse_stun_servers(raw: str | None) -> list[str]:
    """``DARKMATTER_STUN_SERVERS``: comma-separated ``stun:``/``stuns:`` URLs; unset = the §9.1 default;
    empty = none (host candidates only)."""
    if raw is None:
        return [DEFAULT_STUN]
    urls = [part.strip() for part in raw.split(",") if part.strip()]
    for url in urls:
        if not url.lower().startswith(("stun:", "stuns:")) or any(c.isspace() for c in url):
            raise ConfigError(f"DARKMATTER_STUN_SERVERS entry {url[:80]!r} is not a STUN URL "
                              "(use stun:host:port, comma-separated; empty for host candidates only)")
    return urls


def _import_aiortc() -> Any:
    try:
        return importlib.import_module("aiortc")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native dependency (libav)
        log.warning("WebRTC unavailable: aiortc cannot be imported (%s)", exc)
        return None


class WebRTCTransport:
    name = NAME
    priority = PRIORITY

    def __init__(self, node: Node):
        self.node = node
        config = node.config
        self.stun_servers = parse_stun_servers(config.get_str("DARKMATTER_STUN_SERVERS"))
        self.gather_timeout = config.get_float("DARKMATTER_WEBRTC_GATHER_TIMEOUT", GATHER_TIMEOUT, minimum=0.1)
        self.open_timeout = config.get_float("DARKMATTER_WEBRTC_OPEN_TIMEOUT", OPEN_TIMEOUT, minimum=0.1)
        self.ack_timeout = config.get_float("DARKMATTER_WEBRTC_ACK_TIMEOUT", ACK_TIMEOUT, minimum=0.1)
        self.links: dict[str, Link] = {}          # open and installed, by agent_id
        self.negotiating: dict[str, Link] = {}    # answered offers whose channel is not open yet
        self.locks: dict[str, asyncio.Lock] = {}
        self.seen_offers: dict[str, float] = {}  # signature -> when, for the freshness window (replays)
        self._rtc: asyncio.Future | None = None
        self._overhead = frame_overhead(MESSAGE_PATH)
        self.running = False

    # --- aiortc, loaded lazily and off the event loop ------------------------------------------

    async def rtc(self) -> Any:
        """The aiortc module, or None when it cannot be imported."""
        if self._rtc is None:
            self._rtc = asyncio.ensure_future(asyncio.to_thread(_import_aiortc))
        return await asyncio.shield(self._rtc)

    def rtc_configuration(self, rtc: Any) -> Any:
        # NOTE: iceServers=None would make aiortc use its own public default; pass the list, even empty.
        return rtc.RTCConfiguration(iceServers=[rtc.RTCIceServer(urls=url) for url in self.stun_servers])

    def first_sight(self, signature: str) -> bool:
        """Remember a verified offer's signature for the freshness window; False when it was seen before (a
        replay: the real offerer signs every offer afresh)."""
        now = time.monotonic()
        if len(self.seen_offers) > 256:
            for old, at in list(self.seen_offers.items()):
                if now - at > FRESH_SECONDS + 5:
                    del self.seen_offers[old]
        key = signature.lower()
        if key in self.seen_offers and now - self.seen_offers[key] <= FRESH_SECONDS + 5:
            return False
        self.seen_offers[key] = now
        return True

    def lock_for(self, agent_id: str) -> asyncio.Lock:
        lock = self.locks.get(agent_id)
        if lock is None:
            lock = self.locks[agent_id] = asyncio.Lock()
        return lock

    # --- Transport protocol --------------------------------------------------------------------

    # A data channel rides on an existing connection: it reaches no URL by itself.
    def handles(self, url: str) -> bool:
        return False

    async def check(self, url: str, strict: bool) -> None:
        raise Blocked("the WebRTC transport reaches no URL")

    async def request(self, method: str, url: str, **options: Any) -> Reply:
        raise TransportUnavailable("the WebRTC transport carries envelopes to connections only")

    def can_send(self, connection: dict, size: int) -> bool:
        link = self.links.get(connection.get("agent_id", ""))
        return link is not None and link.is_open and size + self._overhead <= MAX_FRAME

    async def send(self, connection: dict, path: str, payload: dict) -> Reply:
        agent_id = connection["agent_id"]
        link = self.links.get(agent_id)
        if link is None or not link.is_open:
            raise TransportUnavailable("no open WebRTC channel")
        if path != MESSAGE_PATH:
            raise TransportUnavailable("only /message uses the WebRTC channel")  # §9.3
        frame_id = new_frame_id()
        text = dumps({"path": path, "payload": payload, "frame_id": frame_id})
        if len(text.encode("utf-8")) > MAX_FRAME:
            raise TransportUnavailable(f"frame larger than {MAX_FRAME} bytes")
        started = time.monotonic()
        if not known_03(connection):
            try:
                link.send_text(text)
            except Exception as exc:  # noqa: BLE001 - aiortc raises InvalidStateError on a closed channel
                raise TransportUnavailable(f"WebRTC send failed: {exc}") from None
            return Reply(200, {"success": True, "acknowledged": False}, transport=NAME,
                         elapsed_ms=(time.monotonic() - started) * 1000, extra={"acknowledged": False})
        future = asyncio.get_running_loop().create_future()
        link.pending[frame_id] = future
        try:
            link.send_text(text)
            status, body = await asyncio.wait_for(future, self.ack_timeout)
        except asyncio.TimeoutError:
            log.warning("no ack from %s within %.0f s; closing the channel and resending over HTTP",
                        agent_id[:16], self.ack_timeout)
            self.node.spawn(link.close(), name="webrtc-close")
            raise TransportUnavailable(f"no WebRTC ack within {self.ack_timeout:.0f} s") from None
        except Exception as exc:  # noqa: BLE001 - channel lost while waiting: the kernel resends over HTTP
            raise TransportUnavailable(f"WebRTC channel lost before the ack ({exc})") from None
        finally:
            link.pending.pop(frame_id, None)
        retry_after = None
        if status == 429 and isinstance(body, dict) and isinstance(body.get("retry_after"), (int, float)):
            retry_after = float(body["retry_after"])
        return Reply(status, body, transport=NAME, elapsed_ms=(time.monotonic() - started) * 1000,
                     retry_after=retry_after, extra={"acknowledged": True})

    # --- links ---------------------------------------------------------------------------------

    def install(self, link: Link) -> None:
        """A channel opened: make it the connection's transport, replacing (closing) an older one."""
        agent_id = link.agent_id
        conn = self.node.connections.get(agent_id)
        if conn is None or not self.running:
            self.node.spawn(link.close(), name="webrtc-close")
            return
        if self.negotiating.get(agent_id) is link:
            del self.negotiating[agent_id]
        old = self.links.get(agent_id)
        self.links[agent_id] = link
        if old is not None and old is not link:
            self.node.spawn(old.close(), name="webrtc-close")
        conn["transport"] = NAME
        log.info("WebRTC data channel open to %s", agent_id[:16])
        self.node.save_soon()
        self.node.changed()

    def lost(self, link: Link, reason: str) -> None:
        """A channel closed or failed: un-acked frames fall back to HTTP; the connection reverts to http."""
        if link.lost:
            return
        link.lost = True
        link.fail_pending(reason)
        agent_id = link.agent_id
        if self.negotiating.get(agent_id) is link:
            del self.negotiating[agent_id]
        if self.links.get(agent_id) is link:
            del self.links[agent_id]
            conn = self.node.connections.get(agent_id)
            if conn is not None:
                conn["transport"] = "http"
            log.info("WebRTC channel to %s lost (%s); using HTTP", agent_id[:16], reason)
            self.node.save_soon()
            self.node.changed()
        if not link.closing and self.running:
            self.node.spawn(link.close(), name="webrtc-close")

    async def close(self, agent_id: str) -> bool:
        """Close the channel to ``agent_id`` (and any offer in negotiation). True if one was open."""
        link = self.links.get(agent_id)
        pending = self.negotiating.get(agent_id)
        for item in (link, pending):
            if item is not None:
                await item.close()
        return link is not None

    async def close_all(self) -> None:
        items = list(self.links.values()) + list(self.negotiating.values())
        await asyncio.gather(*(item.close(defer=False) for item in items), return_exceptions=True)
        for conn in self.node.connections.values():
            if conn.get("transport") == NAME:
                conn["transport"] = "http"

    def open_peers(self) -> list[str]:
        return [agent_id for agent_id, link in self.links.items() if link.is_open]

    # --- incoming frames (§9.2) ----------------------------------------------------------------

    async def handle_frame(self, link: Link, text: str) -> None:
        if len(text.encode("utf-8")) > MAX_BODY:
            log.info("dropping a frame over %d bytes from %s", MAX_BODY, link.agent_id[:16])
            return
        try:
            frame = loads_object(text)
        except ProtocolError:
            log.info("dropping a frame that is not a JSON object from %s", link.agent_id[:16])
            return
        path = frame.get("path")
        if path == ACK_PATH:
            self._ack(link, frame.get("payload"))
            return
        frame_id = frame.get("frame_id")
        if not isinstance(frame_id, str) or not 0 < len(frame_id) <= 128:
            frame_id = None  # a 0.2 peer: process, never ack
        if path == MESSAGE_PATH:
            async with link.slot:
                status, body = await self._message(link, frame.get("payload"))
        else:
            status, body = 404, {"error": "Not found", "code": "not_found"}
        if frame_id is None:
            return
        ack = dumps({"path": ACK_PATH, "payload": {"frame_id": frame_id, "status": status, "body": body}})
        try:
            link.send_text(ack)
        except Exception as exc:  # noqa: BLE001 - the sender falls back to HTTP without the ack
            log.info("could not ack frame to %s: %s", link.agent_id[:16], exc)

    async def _message(self, link: Link, payload: Any) -> tuple[int, Any]:
        """§4.7 applied to a frame's payload, as the HTTP route would answer it."""
        try:
            if not isinstance(payload, dict):
                raise ProtocolError(400, "invalid_json", "Invalid JSON body: expected an object")
            sender = payload.get("from_agent_id")
            if isinstance(sender, str) and sender and sender != link.agent_id:
                raise forbidden("This data channel belongs to another agent than from_agent_id")
            caller = Caller(ip=link.remote_ip(), transport=NAME)
            return 200, await handle(self.node, "message", caller, payload)
        except ProtocolError as exc:
            return exc.status, exc.body()
        except Exception:  # noqa: BLE001 - bad input never gets a stack trace; the sender may retry
            log.exception("handling a WebRTC message frame failed")
            return 503, {"error": "Internal error", "code": "unavailable"}

    def _ack(self, link: Link, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        future = link.pending.get(payload.get("frame_id")) if isinstance(payload.get("frame_id"), str) else None
        if future is None or future.done():
            return  # unknown or late ack (the frame already went over HTTP)
        status = payload.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            future.set_exception(ConnectionError("malformed ack frame"))
            return
        future.set_result((status, payload.get("body")))
