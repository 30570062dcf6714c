"""LAN beacons on loopback only: the listener is joined on 127.0.0.1 and every datagram in these tests is
sent to 127.0.0.1, or to the loopback broadcast address 127.255.255.255 (which every socket bound to the port
receives, as with multicast), so nothing leaves this host (the multicast tests live in test_lan_netns.py)."""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid

import anyio
import pytest

from darkmatter.api import Identity, v2_beacon, verify
from darkmatter.api import active_plugins
from darkmatter.testing import PeerServer, make_node
from darkmatter_discovery_lan import LanBeacon, build_beacon, encode

BEACON_FIELDS = {"proto", "v", "agent_id", "display_name", "public_key_hex", "bio", "port", "status", "genesis",
                 "accepting", "ts", "signature_v2_hex"}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lan_node(tmp_path, udp_port: int, name: str = "n", **env):
    settings = {"DARKMATTER_DISCOVERY": "true", "DARKMATTER_LAN_PORT": str(udp_port),
                "DARKMATTER_LAN_INTERFACE": "127.0.0.1", "DARKMATTER_LAN_BEACON_INTERVAL": "0.2"}
    settings.update(env)
    # http_transport: a signed beacon's URL is recorded once the peer proved its key there (§6.1)
    return make_node(tmp_path / name, plugins="http_transport,discovery_lan", **settings)


def lan_source(node) -> LanBeacon:
    return next(s for s in node.discovery_sources if isinstance(s, LanBeacon))


def signed_beacon(identity: Identity, *, agent_id: str | None = None, port: int = 8101, ts: float | None = None,
                  **fields) -> dict:
    beacon = {"proto": "darkmatter", "v": "0.3", "agent_id": agent_id or identity.public_key_hex,
              "display_name": "peer", "public_key_hex": identity.public_key_hex, "bio": "a test peer",
              "port": port, "status": "active", "genesis": False, "accepting": True,
              "ts": int(time.time()) if ts is None else ts}
    beacon.update(fields)
    beacon["signature_v2_hex"] = identity.sign(v2_beacon(beacon))
    return beacon


def send(udp_port: int, payload: bytes | dict, to: str = "127.0.0.1") -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if to.endswith(".255"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.sendto(data, (to, udp_port))


async def wait_for(predicate, timeout: float = 10.0) -> bool:
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)
        return True
    return False


async def wait_listening(node) -> LanBeacon:
    source = lan_source(node)
    assert await wait_for(lambda: source._listener is not None), "the LAN listener never opened"
    return source


def test_entry_point_is_wired(tmp_path):
    node = lan_node(tmp_path, free_udp_port())
    assert "discovery_lan" in [p.name for p in active_plugins(node.pm)]
    assert [s.name for s in node.discovery_sources] == ["lan"]


def test_bad_settings_are_clear_errors(tmp_path):
    from darkmatter.api import ConfigError

    with pytest.raises(ConfigError, match="DARKMATTER_LAN_GROUP='10.0.0.1' is not an IPv4 multicast group"):
        lan_node(tmp_path, 9, DARKMATTER_LAN_GROUP="10.0.0.1")
    with pytest.raises(ConfigError, match="DARKMATTER_LAN_PORT='x'"):
        lan_node(tmp_path, 9, DARKMATTER_LAN_PORT="x")
    with pytest.raises(ConfigError, match="DARKMATTER_LAN_INTERFACE='eth0' is not an IPv4 address"):
        lan_node(tmp_path, 9, DARKMATTER_LAN_INTERFACE="eth0")


@pytest.mark.anyio
async def test_signed_beacon_is_recorded_with_sender_address(tmp_path):
    port = free_udp_port()
    async with lan_node(tmp_path, port) as node:
        await wait_listening(node)
        peer = Identity.generate()
        async with PeerServer(peer) as server:
            send(port, signed_beacon(peer, port=server.port, bio="b" * 100))
            assert await wait_for(lambda: peer.public_key_hex in node.discovered)
        entry = node.discovered[peer.public_key_hex]
        assert entry["url"] == server.url
        assert entry["source"] == "lan" and entry["verified"] is True
        assert entry["public_key_hex"] == peer.public_key_hex
        assert entry["protocol_version"] == "0.3" and entry["accepting"] is True and entry["genesis"] is False
        assert entry["display_name"] == "peer" and entry["bio"] == "b" * 100 and entry["status"] == "active"


@pytest.mark.anyio
async def test_forged_beacon_records_nothing(tmp_path):
    port = free_udp_port()
    async with lan_node(tmp_path, port) as node:
        await wait_listening(node)
        victim, attacker = Identity.generate(), Identity.generate()
        # 1. the victim's id and key, signed by the attacker's key
        forged = signed_beacon(attacker, agent_id=victim.public_key_hex, public_key_hex=victim.public_key_hex)
        # 2. a genuine beacon whose port was changed after signing (to point peers elsewhere)
        tampered = signed_beacon(victim)
        tampered["port"] = 9999
        # 3. a random signature
        garbage = signed_beacon(victim)
        garbage["signature_v2_hex"] = "ab" * 64
        for payload in (forged, tampered, garbage):
            send(port, payload)
        # A genuine beacon sent afterwards proves the listener read the forged ones first.
        control = Identity.generate()
        async with PeerServer(control) as server:
            send(port, signed_beacon(control, port=server.port))
            assert await wait_for(lambda: control.public_key_hex in node.discovered)
        await anyio.sleep(0.3)
        assert victim.public_key_hex not in node.discovered
        assert set(node.discovered) == {control.public_key_hex}


@pytest.mark.anyio
async def test_ignored_datagrams(tmp_path):
    port = free_udp_port()
    async with lan_node(tmp_path, port) as node:
        await wait_listening(node)
        ids = [Identity.generate() for _ in range(7)]
        send(port, b"\xff\xfenot json")
        send(port, b"[1, 2, 3]")
        send(port, signed_beacon(ids[0], proto="ssdp"))                       # not darkmatter
        send(port, signed_beacon(ids[1], ts=time.time() - 301))               # stale
        send(port, signed_beacon(ids[2], ts=time.time() + 301))               # from the future
        send(port, signed_beacon(ids[3], bio="x" * 2100))                     # > 2048 bytes
        other = Identity.generate()
        send(port, signed_beacon(ids[4], agent_id=other.public_key_hex))      # self-certifying id ≠ key
        unsigned = signed_beacon(ids[5])
        del unsigned["signature_v2_hex"]
        send(port, unsigned)                                                  # unsigned with a 0.3 id
        send(port, signed_beacon(ids[6], port=0))                             # no usable port
        own = build_beacon(node)
        send(port, encode(own))                                               # its own id
        control = Identity.generate()
        async with PeerServer(control) as server:
            send(port, signed_beacon(control, port=server.port))
            assert await wait_for(lambda: control.public_key_hex in node.discovered)
        await anyio.sleep(0.3)
        assert set(node.discovered) == {control.public_key_hex}


@pytest.mark.anyio
async def test_unsigned_02_beacon_is_kept_unverified(tmp_path):
    port = free_udp_port()
    async with lan_node(tmp_path, port) as node:
        await wait_listening(node)
        legacy_id = str(uuid.uuid4())
        beacon = {"proto": "darkmatter", "v": "0.2", "agent_id": legacy_id, "display_name": "old",
                  "public_key_hex": None, "bio": "a 0.2 node", "port": 8105, "status": "active",
                  "genesis": True, "accepting": True, "ts": int(time.time()) - 1000}
        send(port, beacon)
        assert await wait_for(lambda: legacy_id in node.discovered)
        entry = node.discovered[legacy_id]
        assert entry["verified"] is False and entry["source"] == "lan"
        assert entry["url"] == "http://127.0.0.1:8105" and entry["protocol_version"] == "0.2"


@pytest.mark.anyio
async def test_beacon_payload_is_02_fields_plus_signature(tmp_path):
    async with lan_node(tmp_path, free_udp_port(), DARKMATTER_BIO="z" * 300) as node:
        beacon = build_beacon(node)
        assert set(beacon) == BEACON_FIELDS
        assert beacon["proto"] == "darkmatter" and beacon["v"] == "0.3"
        assert beacon["agent_id"] == node.agent_id and beacon["port"] == node.port
        assert beacon["bio"] == "z" * 100 and isinstance(beacon["ts"], int)
        assert abs(beacon["ts"] - time.time()) < 5
        assert verify(node.public_key_hex, v2_beacon(beacon), beacon["signature_v2_hex"])
        data = encode(beacon)
        assert len(data) <= 2048 and b": " not in data and b", " not in data  # compact JSON


@pytest.mark.anyio
async def test_loopback_node_listens_but_does_not_send(tmp_path):
    port = free_udp_port()
    async with lan_node(tmp_path, port) as node:
        source = await wait_listening(node)
        await anyio.sleep(0.5)  # more than two beacon intervals
        assert node.bind_is_loopback and not source.sends
        assert source._sender is None and source.sent == 0


@pytest.mark.anyio
async def test_several_nodes_share_the_port(tmp_path):
    """Two nodes on one host listen on the same UDP port and both receive a beacon: sent to the loopback
    broadcast address, it reaches every socket bound to the port (a unicast datagram would reach one)."""
    port = free_udp_port()
    async with lan_node(tmp_path, port, "a") as a, lan_node(tmp_path, port, "b") as b:
        source_a, source_b = await wait_listening(a), await wait_listening(b)
        peer = Identity.generate()
        async with PeerServer(peer) as server:  # where the peer proves its key (§6.1)
            send(port, signed_beacon(peer, port=server.port), to="127.255.255.255")
            both = await wait_for(lambda: peer.public_key_hex in a.discovered and peer.public_key_hex in b.discovered)
            assert both, (sorted(a.discovered), sorted(b.discovered))
        assert source_a.received_count == source_b.received_count == 1
        assert a.discovered[peer.public_key_hex]["url"] == b.discovered[peer.public_key_hex]["url"] == server.url


@pytest.mark.anyio
async def test_port_in_use_is_logged_once_and_node_runs_on(tmp_path, caplog):
    port = free_udp_port()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # no SO_REUSEADDR: the port is taken
    blocker.bind(("", port))
    try:
        caplog.set_level(logging.WARNING, logger="darkmatter_discovery_lan")
        async with lan_node(tmp_path, port) as node:
            source = lan_source(node)
            assert await wait_for(lambda: "LAN discovery" in caplog.text)
            await anyio.sleep(0.5)
            assert node.started and source._listener is None
            task = next(t for t in node.tasks if t.get_name() == "discovery-lan")
            assert not task.done(), "the discovery task must keep running"
            warnings = [r for r in caplog.records if r.name == "darkmatter_discovery_lan"]
            assert len(warnings) == 1 and f"{port}" in warnings[0].getMessage()
    finally:
        blocker.close()


@pytest.mark.anyio
async def test_discovery_false_starts_no_listener(tmp_path):
    port = free_udp_port()
    async with lan_node(tmp_path, port, DARKMATTER_DISCOVERY="false") as node:
        await anyio.sleep(0.3)
        assert not any(t.get_name().startswith("discovery") for t in node.tasks)
        # Nobody holds the port: a socket without SO_REUSEADDR can take it.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("", port))
        peer = Identity.generate()
        send(port, signed_beacon(peer))
        await anyio.sleep(0.3)
        assert node.discovered == {}


@pytest.mark.anyio
async def test_lan_entries_are_pruned(tmp_path):
    port = free_udp_port()
    async with lan_node(tmp_path, port, DARKMATTER_DISCOVERY_PRUNE_SECONDS="0.5") as node:
        await wait_listening(node)
        peer = Identity.generate()
        async with PeerServer(peer) as server:
            send(port, signed_beacon(peer, port=server.port))
            assert await wait_for(lambda: peer.public_key_hex in node.discovered)
        assert await wait_for(lambda: peer.public_key_hex not in node.discovered, timeout=5)


@pytest.mark.anyio
async def test_a_fresh_local_entry_beats_a_lan_beacon(tmp_path):
    port = free_udp_port()
    async with lan_node(tmp_path, port) as node:
        await wait_listening(node)
        peer, control = Identity.generate(), Identity.generate()
        async with PeerServer(peer) as server, PeerServer(control) as control_server:
            # The kernel's table already holds this peer from the local scan (another source).
            node.record_discovered({"agent_id": peer.public_key_hex, "url": server.url,
                                    "public_key_hex": peer.public_key_hex, "source": "local"})
            assert await wait_for(lambda: peer.public_key_hex in node.discovered)
            send(port, signed_beacon(peer, port=server.port))
            send(port, signed_beacon(control, port=control_server.port))
            assert await wait_for(lambda: control.public_key_hex in node.discovered)
        await anyio.sleep(0.2)
        assert node.discovered[peer.public_key_hex]["source"] == "local"
        assert lan_source(node).received_count >= 2  # the peer's beacon was read and valid, yet not recorded
