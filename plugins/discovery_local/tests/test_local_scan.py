"""The local scan against hand-written peers on loopback: what counts as a DarkMatter node, and the table rules.

The peers here are tiny real HTTP servers on 127.0.0.1 that answer the well-known path with a chosen body,
as a 0.2 node, a foreign service or a liar would. Real nodes meet each other in test_local_nodes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import anyio
import pytest

from darkmatter.api import Config, ConfigError
from darkmatter.api import Identity, now_iso, v2_string
from darkmatter.api import active_plugins
from darkmatter.testing import make_node
from darkmatter.api import Session
from darkmatter_discovery_local import LocalScan


class Peer:
    """An HTTP server on a loopback port whose well-known answer the test sets."""

    def __init__(self):
        self.status = 200
        self.body: bytes = b"{}"
        self.hits = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    def answer(self, doc, status: int = 200) -> None:
        self.status = status
        self.body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if b" /.well-known/darkmatter.json " in request.split(b"\r\n", 1)[0]:
                self.hits += 1
                status, body = self.status, self.body
            elif b"POST /__darkmatter__/challenge " in request.split(b"\r\n", 1)[0]:
                status, body = await self._challenge(reader, request)
            else:
                status, body = 404, b'{"error": "not found"}'
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (status, len(body)) + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _challenge(self, reader: asyncio.StreamReader, head: bytes) -> tuple[int, bytes]:
        """Prove the key of the identity this peer's document names (§6.1), as the real node would."""
        length = int(next((line.split(b":", 1)[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), b"0"))
        asked = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
        try:
            shown = json.loads(self.body).get("agent_id")
        except (ValueError, AttributeError):
            shown = None
        identity = KEYS.get(asked.get("agent_id"))
        if identity is None or shown != asked["agent_id"]:
            return 404, b'{"error": "unknown agent", "code": "unknown_agent"}'
        url, ts = f"http://127.0.0.1:{self.port}", now_iso()
        signature = identity.sign(v2_string("challenge", asked["nonce"], asked["agent_id"], asked["from_agent_id"],
                                            url, ts))
        return 200, json.dumps({"agent_id": asked["agent_id"], "url": url, "timestamp": ts,
                                "signature_v2_hex": signature}).encode()

    async def __aenter__(self) -> Peer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


KEYS: dict[str, Identity] = {}  # the identities the documents below name, so a Peer can prove them


def document(identity: Identity, **fields) -> dict:
    KEYS[identity.public_key_hex] = identity
    doc = {"darkmatter": True, "protocol_version": "0.3", "agent_id": identity.public_key_hex,
           "display_name": "peer", "public_key_hex": identity.public_key_hex, "bio": "hello",
           "status": "active", "accepting_connections": True, "is_genesis": False,
           "mesh_url": "x", "mcp_url": "y", "webrtc_enabled": False, "plugins": []}
    doc.update(fields)
    return doc


def scanning_node(tmp_path, ports, **env):
    settings = {"DARKMATTER_DISCOVERY": "true", "DARKMATTER_DISCOVERY_PORTS": ",".join(map(str, ports)),
                "DARKMATTER_DISCOVERY_INTERVAL": "3600"}
    settings.update(env)
    return make_node(tmp_path / "scanner", plugins="http_transport,discovery_local", **settings)


def local_source(node) -> LocalScan:
    return next(s for s in node.discovery_sources if isinstance(s, LocalScan))


async def discover(node) -> dict:
    return await node.tools["darkmatter_discover_local"].handler(node, {}, Session())


def test_entry_point_is_wired(tmp_path):
    node = scanning_node(tmp_path, [8100])
    assert "discovery_local" in [p.name for p in active_plugins(node.pm)]
    assert [s.name for s in node.discovery_sources] == ["local"]
    assert node.tools["darkmatter_discover_local"].plugin == "discovery_local"


@pytest.mark.parametrize("value, words", [
    ("abc", "'abc' is not a port or a lo-hi range"),
    ("8100-80", "'8100-80' is not within 1-65535"),
    ("0", "'0' is not within 1-65535"),
    ("70000", "'70000' is not within 1-65535"),
    ("8100-9000", "lists more than 256 ports"),
    (",", "lists no ports"),
])
def test_garbage_ports_are_rejected_with_a_clear_message(tmp_path, value, words):
    with pytest.raises(ConfigError) as info:
        Config.from_env({"HOME": str(tmp_path), "DARKMATTER_DISCOVERY_PORTS": value})
    assert "DARKMATTER_DISCOVERY_PORTS" in str(info.value) and words in str(info.value)


def test_port_lists_and_ranges_are_accepted(tmp_path):
    config = Config.from_env({"HOME": str(tmp_path), "DARKMATTER_DISCOVERY_PORTS": " 9000-9002, 8100 ,9001"})
    assert config.discovery_ports == [8100, 9000, 9001, 9002]
    assert Config.from_env({"HOME": str(tmp_path)}).discovery_ports == list(range(8100, 8111))


def test_bad_interval_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="DARKMATTER_DISCOVERY_INTERVAL='soon' is not a number"):
        scanning_node(tmp_path, [8100], DARKMATTER_DISCOVERY_INTERVAL="soon")


@pytest.mark.anyio
async def test_only_foreign_darkmatter_documents_count(tmp_path):
    good, legacy = Identity.generate(), "5b1a8c7e-7c43-4c8e-9a57-1f7bd8a7e3a1"
    async with contextlib.AsyncExitStack() as stack:
        peers = [await stack.enter_async_context(Peer()) for _ in range(8)]
        peers[0].answer(document(good))
        peers[1].answer({"darkmatter": True, "protocol_version": "0.2", "agent_id": legacy, "bio": "old",
                         "status": "active", "accepting_connections": False, "display_name": None,
                         "public_key_hex": None})
        peers[2].answer(document(Identity.generate(), darkmatter=False))      # says it is not DarkMatter
        peers[3].answer(document(Identity.generate(), darkmatter="true"))     # not the JSON true
        peers[4].answer(document(Identity.generate()), status=404)            # not a 200
        peers[5].answer(b"<html>hello</html>")                                # not JSON
        peers[6].answer(document(Identity.generate(), agent_id=""))           # empty id
        liar = Identity.generate()
        peers[7].answer(document(liar, agent_id=Identity.generate().public_key_hex))  # id ≠ its key
        node = scanning_node(tmp_path, [p.port for p in peers])
        async with node:
            result = await discover(node)
            assert result["discovery_enabled"] is True
            assert result["total"] == 2 == len(result["peers"])
            by_id = {p["agent_id"]: p for p in result["peers"]}
            assert set(by_id) == {good.public_key_hex, legacy}
            entry = by_id[good.public_key_hex]
            assert entry["url"] == f"http://127.0.0.1:{peers[0].port}" and entry["source"] == "local"
            assert entry["display_name"] == "peer" and entry["bio"] == "hello" and entry["status"] == "active"
            assert entry["accepting"] is True and entry["genesis"] is False
            assert entry["public_key_hex"] == good.public_key_hex and entry["protocol_version"] == "0.3"
            assert entry["connected"] is False and entry["seen_seconds_ago"] < 5 and "T" in entry["last_seen"]
            old = by_id[legacy]
            assert old["protocol_version"] == "0.2" and old["accepting"] is False
            assert all(p.hits >= 1 for p in peers)


@pytest.mark.anyio
async def test_own_port_and_own_id_are_skipped(tmp_path):
    async with Peer() as mirror:
        node = scanning_node(tmp_path, [mirror.port])
        async with node:
            # A port answering with this node's own identity is not a peer.
            mirror.answer({"darkmatter": True, "agent_id": node.agent_id, "public_key_hex": node.public_key_hex})
            before = mirror.hits
            result = await discover(node)
            assert result["total"] == 0 and mirror.hits == before + 1
            # The node's own port is never probed: pretend the mirror's port is the node's.
            real_port, node.port = node.port, mirror.port
            try:
                await discover(node)
            finally:
                node.port = real_port
            assert mirror.hits == before + 1
            await discover(node)
            assert mirror.hits == before + 2


@pytest.mark.anyio
async def test_a_port_answering_with_another_id_replaces_its_entry(tmp_path):
    first, second = Identity.generate(), Identity.generate()
    async with Peer() as peer:
        peer.answer(document(first))
        async with scanning_node(tmp_path, [peer.port]) as node:
            await discover(node)
            assert set(node.discovered) == {first.public_key_hex}
            peer.answer(document(second))
            await discover(node)
            assert set(node.discovered) == {second.public_key_hex}


@pytest.mark.anyio
async def test_slow_and_silent_ports_are_bounded(tmp_path):
    """Ports that accept but never answer do not hold the scan: it returns while they still stall (each costs
    at most the 0.5 s total timeout), having probed all ten at once, not one after another."""
    hold = anyio.Event()
    open_now, most_at_once = 0, 0

    async def stall(reader, writer):
        nonlocal open_now, most_at_once
        open_now += 1
        most_at_once = max(most_at_once, open_now)
        try:
            await reader.read()  # until the scanner gives up and closes its side
        finally:
            open_now -= 1
        await hold.wait()
        writer.close()

    servers = [await asyncio.start_server(stall, "127.0.0.1", 0) for _ in range(10)]
    try:
        node = scanning_node(tmp_path, [s.sockets[0].getsockname()[1] for s in servers])
        async with node:
            started = anyio.current_time()
            with anyio.fail_after(30):  # generous: a scan waiting for the stalled ports would never return
                result = await discover(node)
            elapsed = anyio.current_time() - started
            assert result["total"] == 0
            assert most_at_once == 10, f"at most {most_at_once} of the ten stalled ports were probed at once"
            assert not hold.is_set()
            print(f"ten stalled ports scanned in {elapsed:.2f} s")
    finally:
        hold.set()
        for server in servers:
            server.close()


@pytest.mark.anyio
async def test_discovery_false_scans_nothing(tmp_path):
    async with Peer() as peer:
        peer.answer(document(Identity.generate()))
        async with scanning_node(tmp_path, [peer.port], DARKMATTER_DISCOVERY="false") as node:
            await anyio.sleep(0.3)
            assert not any(t.get_name().startswith("discovery") for t in node.tasks)
            result = await discover(node)
            assert result == {"discovery_enabled": False, "total": 0, "peers": []}
            assert peer.hits == 0


@pytest.mark.anyio
async def test_periodic_scan_finds_a_late_peer_and_prunes_a_gone_one(tmp_path):
    identity = Identity.generate()
    async with Peer() as peer:
        node = scanning_node(tmp_path, [peer.port], DARKMATTER_DISCOVERY_INTERVAL="0.3",
                             DARKMATTER_DISCOVERY_PRUNE_SECONDS="1.0")
        async with node:
            source = local_source(node)
            with anyio.fail_after(10):
                while source.scans < 2:
                    await anyio.sleep(0.05)
            assert node.discovered == {}
            peer.answer(document(identity))
            with anyio.fail_after(10):
                while identity.public_key_hex not in node.discovered:
                    await anyio.sleep(0.05)
            peer.answer(b"gone", status=503)
            seen = anyio.current_time()
            with anyio.fail_after(10):
                while identity.public_key_hex in node.discovered:
                    await anyio.sleep(0.05)
            assert anyio.current_time() - seen > 0.5, "pruned before the prune age"
