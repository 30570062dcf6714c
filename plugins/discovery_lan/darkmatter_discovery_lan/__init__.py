"""Discover DarkMatter nodes on the LAN by UDP multicast beacons (docs/protocol.md §8.2).

Every ``DARKMATTER_LAN_BEACON_INTERVAL`` seconds (default 30) the node multicasts a signed beacon to
``DARKMATTER_LAN_GROUP``:``DARKMATTER_LAN_PORT`` (default 239.77.68.77:8470), TTL 2, with multicast loop on
so that nodes on one host hear each other. A node bound only to loopback does not send (its URL is
unreachable from the LAN) but still listens. The listener binds ``("", port)`` with SO_REUSEADDR and
SO_REUSEPORT, so several nodes on one host share the port, and joins the group on INADDR_ANY (or on
``DARKMATTER_LAN_INTERFACE``). Setup and send failures are logged once; the node runs on without them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
import time
from typing import Any, Callable

from darkmatter.api import (FRESH_SECONDS, MAX_ID, PROTOCOL_VERSION, ConfigError, ProtocolError, hookimpl,
                            is_self_certifying, loads_strict, v2_beacon, verify)

__version__ = "0.3.0"

log = logging.getLogger(__name__)

GROUP = "239.77.68.77"
PORT = 8470
TTL = 2
MAX_DATAGRAM = 2048
BIO_MAX = 100
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX128 = re.compile(r"^[0-9a-fA-F]{128}$")


def _ipv4(config, name: str, default: str | None, *, multicast: bool = False) -> str | None:
    raw = config.get_str(name)
    if raw is None or not raw.strip():
        return default
    try:
        address = ipaddress.IPv4Address(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an IPv4 address") from None
    if multicast and not address.is_multicast:
        raise ConfigError(f"{name}={raw!r} is not an IPv4 multicast group (224.0.0.0/4)")
    return str(address)


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_beacon(node) -> dict:
    """The §8.2 payload: exactly the 0.2 fields, then the v2 `beacon` signature over them."""
    state = node.state
    beacon = {
        "proto": "darkmatter",
        "v": PROTOCOL_VERSION,
        "agent_id": node.agent_id,
        "display_name": state.get("display_name"),
        "public_key_hex": node.public_key_hex,
        "bio": (state.get("bio") or "")[:BIO_MAX],
        "port": node.port,
        "status": state.get("status"),
        "genesis": bool(state.get("is_genesis")),
        "accepting": node.accepting_connections(),
        "ts": int(time.time()),
    }
    beacon["signature_v2_hex"] = node.sign(v2_beacon(beacon))
    return beacon


def encode(beacon: dict) -> bytes:
    return json.dumps(beacon, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def entry_from_beacon(node, data: bytes, source_ip: str, *, now: float | None = None) -> dict | None:
    """The §8.1/§8.2 entry for one datagram, or None when it must be ignored (the reason is logged)."""
    if len(data) > MAX_DATAGRAM:
        return _drop(source_ip, "larger than 2048 bytes")
    try:
        beacon = loads_strict(data)
    except ProtocolError:
        return _drop(source_ip, "not JSON")
    if not isinstance(beacon, dict) or beacon.get("proto") != "darkmatter":
        return _drop(source_ip, "not a DarkMatter beacon")
    agent_id = beacon.get("agent_id")
    if not isinstance(agent_id, str) or not agent_id.strip() or len(agent_id) > MAX_ID:
        return _drop(source_ip, "no usable agent_id")
    if agent_id == node.agent_id:
        return None
    port = beacon.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        return _drop(source_ip, "no usable port")
    key = beacon.get("public_key_hex")
    key = key.lower() if isinstance(key, str) and _HEX64.match(key) else None
    signature = beacon.get("signature_v2_hex")
    if signature is None:
        # An unsigned beacon is 0.2's. A self-certifying id is 0.3's, which always signs: a forgery.
        if is_self_certifying(agent_id):
            return _drop(source_ip, "unsigned beacon for a self-certifying id")
        verified = False
    else:
        if not isinstance(signature, str) or not _HEX128.match(signature) or key is None:
            return _drop(source_ip, "malformed signature or key")
        if is_self_certifying(agent_id) and key != agent_id:
            return _drop(source_ip, "public_key_hex differs from its self-certifying id")
        pinned = node.key_of(agent_id)
        if pinned and pinned.lower() != key:
            return _drop(source_ip, "public_key_hex differs from the key this node knows for that id")
        ts = beacon.get("ts")
        current = time.time() if now is None else now
        if not _number(ts) or abs(current - ts) > FRESH_SECONDS:
            return _drop(source_ip, "stale or missing ts")
        if not verify(key, v2_beacon(beacon), signature):
            return _drop(source_ip, "bad signature")
        verified = True
    version = beacon.get("v")
    return {
        "agent_id": agent_id,
        "url": f"http://{source_ip}:{port}",
        "display_name": _text(beacon.get("display_name"), 200),
        "bio": _text(beacon.get("bio"), 2 * BIO_MAX),
        "status": _text(beacon.get("status"), 32),
        "genesis": beacon.get("genesis") is True,
        "accepting": beacon.get("accepting") is True,
        "public_key_hex": key,
        "protocol_version": _text(version, 16) or "0.2",
        "source": "lan",
        "verified": verified,
    }


def _drop(source_ip: str, why: str) -> None:
    log.debug("LAN datagram from %s ignored: %s", source_ip, why)
    return None


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, beacon_source: LanBeacon):
        self.source = beacon_source

    def datagram_received(self, data: bytes, addr) -> None:
        self.source.received(data, addr[0])

    def error_received(self, exc: Exception) -> None:
        self.source.problem("receive", exc)


class _Sender(asyncio.DatagramProtocol):
    def __init__(self, beacon_source: LanBeacon):
        self.source = beacon_source

    def error_received(self, exc: Exception) -> None:
        self.source.problem("send", exc)


class LanBeacon:
    """The ``lan`` discovery source: one per node, holding a listener and (unless loopback-only) a sender."""

    name = "lan"

    def __init__(self, node):
        self.node = node
        config = node.config
        self.group = _ipv4(config, "DARKMATTER_LAN_GROUP", GROUP, multicast=True)
        self.port = config.get_int("DARKMATTER_LAN_PORT", PORT, minimum=1, maximum=65535)
        self.interval = config.get_float("DARKMATTER_LAN_BEACON_INTERVAL", 30.0, minimum=0.05)
        self.prune_age = config.get_float("DARKMATTER_DISCOVERY_PRUNE_SECONDS", 90.0, minimum=0.05)
        self.interface = _ipv4(config, "DARKMATTER_LAN_INTERFACE", None)
        self._found: Callable[[dict], None] | None = None
        self._listener: asyncio.DatagramTransport | None = None
        self._sender: asyncio.DatagramTransport | None = None
        self._reported: set[str] = set()
        self._last_sent = 0.0
        self.sent = 0
        self.received_count = 0

    # --- setup ------------------------------------------------------------------------------

    def problem(self, what: str, exc: BaseException) -> None:
        """Log a setup or send failure once per kind; later ones go to debug."""
        if what in self._reported:
            log.debug("LAN discovery %s failed again: %s", what, exc)
            return
        self._reported.add(what)
        log.warning("LAN discovery: %s failed (%s); the node runs on without it", what, exc)

    @property
    def sends(self) -> bool:
        """§8.2: a node bound only to loopback does not send beacons; nor does one bound to a single IPv6
        address, which peers could not reach at the IPv4 source address of its beacons."""
        if self.node.bind_is_loopback:
            return False
        if self.node.bind_is_wildcard:
            return True
        try:
            return ipaddress.ip_address(self.node.config.host.strip("[]")).version == 4
        except ValueError:
            return True  # a host name

    def _outgoing_interface(self) -> str | None:
        if self.interface:
            return self.interface
        if not self.node.bind_is_wildcard:
            try:
                return str(ipaddress.IPv4Address(self.node.config.host))
            except ValueError:
                return None
        return None

    def _listener_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                except OSError:
                    pass
            sock.bind(("", self.port))
            mreq = socket.inet_aton(self.group) + socket.inet_aton(self.interface or "0.0.0.0")
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _sender_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            interface = self._outgoing_interface()
            if interface:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
                sock.bind((interface, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = self._listener_socket()
            self._listener, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), sock=sock)
            log.info("LAN discovery listening on %s:%d", self.group, self.port)
        except OSError as exc:
            self.problem(f"listening on {self.group}:{self.port}", exc)
        if self.sends:
            try:
                sock = self._sender_socket()
                self._sender, _ = await loop.create_datagram_endpoint(lambda: _Sender(self), sock=sock)
            except OSError as exc:
                self.problem("beacon sender setup", exc)

    def _close(self) -> None:
        for transport in (self._listener, self._sender):
            if transport is not None:
                transport.close()
        self._listener = self._sender = None

    # --- running ----------------------------------------------------------------------------

    async def run(self, found: Callable[[dict], None]) -> None:
        self._found = found
        await self._open()
        try:
            while True:
                try:
                    self.send_beacon()
                except OSError as exc:
                    self.problem("send", exc)
                self.node.prune_discovered(self.prune_age)
                await asyncio.sleep(self.interval)
        finally:
            self._close()

    async def scan(self) -> None:
        """Announce this node now (at most once a second); answers come as the peers' own beacons."""
        if time.monotonic() - self._last_sent >= 1.0:
            try:
                self.send_beacon()
            except OSError as exc:
                self.problem("send", exc)

    def send_beacon(self) -> None:
        if self._sender is None or self.node.identity is None:
            return
        data = encode(build_beacon(self.node))
        if len(data) > MAX_DATAGRAM:
            beacon = build_beacon(self.node)
            beacon.pop("signature_v2_hex")
            beacon["display_name"] = (beacon["display_name"] or "")[:BIO_MAX]
            beacon["signature_v2_hex"] = self.node.sign(v2_beacon(beacon))
            data = encode(beacon)
        self._last_sent = time.monotonic()
        self._sender.sendto(data, (self.group, self.port))
        self.sent += 1

    def received(self, data: bytes, source_ip: str) -> None:
        if self.node.identity is None:
            return
        try:
            entry = entry_from_beacon(self.node, data, source_ip)
        except Exception:  # noqa: BLE001 - a strange datagram must not break the listener
            log.exception("LAN datagram from %s could not be read", source_ip)
            return
        if entry is None:
            return
        self.received_count += 1
        (self._found or self.node.record_discovered)(entry)


@hookimpl
def dm_register_discovery(register, node):
    register(LanBeacon(node))


__all__ = ["LanBeacon", "build_beacon", "encode", "entry_from_beacon"]
