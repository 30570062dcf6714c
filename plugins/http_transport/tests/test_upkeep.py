"""Mesh upkeep of the http_transport plugin: health loop (docs/protocol.md §6.4), address change through an IP
echo service (§6.5) and the UPnP gate (§6.6).

Everything runs on loopback. The address-change cases need a wildcard bind; they run only inside a network
namespace this test creates with nothing but ``lo`` up, through a driver (this same file, run as a script with
``--netns-driver``) that prints one JSON object of results for the pytest side to check. That needs root:
without it the case is skipped with the reason, and under ``CI=true`` it fails instead.

No real gateway is ever contacted: where UPnP must be switched on, the ``miniupnpc`` library is replaced by a
stand-in whose "gateway" is a list of recorded calls (``fake_miniupnpc``); nothing of DarkMatter is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Self

import pytest
from darkmatter_http_transport import upkeep

from darkmatter import api as actions
from darkmatter.testing import RawPeer, connect, make_node, skip_unless_ci
from darkmatter.api import Session

UPKEEP_LOGGER = "darkmatter_http_transport.upkeep"
FAST_HEALTH = {"DARKMATTER_HEALTH_INTERVAL": "0.2", "DARKMATTER_HEALTH_STALE_SECONDS": "0"}


# --- helpers (also used by the namespace driver) --------------------------------------------------


async def until(predicate, timeout: float, step: float = 0.05) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())


class Echo:
    """A tiny "what is my IP" service on 127.0.0.1: answers GET <path> with ``answers[path]``, counts hits."""

    def __init__(self):
        self.answers: dict[str, object] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> Echo:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = head.split(b" ", 2)[1].decode("ascii", "replace").split("?", 1)[0]
            self.hits[path] += 1
            body = json.dumps(self.answers.get(path, {"ip": None})).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def fake_miniupnpc(conflicts: int = 0) -> types.ModuleType:
    """A stand-in for the ``miniupnpc`` library: its gateway is ``module.calls``; no packet is sent.

    The first ``conflicts`` port mappings fail the way miniupnpc fails (a bare Exception)."""
    module = types.ModuleType("miniupnpc")
    module.calls = []

    class UPnP:
        def __init__(self):
            module.calls.append(("UPnP",))
            self.discoverdelay = 0
            self.lanaddr = "127.0.0.1"

        def discover(self):
            module.calls.append(("discover",))
            return 1

        def selectigd(self):
            module.calls.append(("selectigd",))
            return "http://gateway.invalid/ctl"

        def addportmapping(self, external, proto, lanaddr, port, description, remote):
            module.calls.append(("add", external, proto, lanaddr, port, description))
            if sum(1 for c in module.calls if c[0] == "add") <= conflicts:
                raise Exception("ConflictInMappingEntry")  # noqa: TRY002 - what miniupnpc raises
            return True

        def deleteportmapping(self, external, proto):
            module.calls.append(("delete", external, proto))
            return True

    module.UPnP = UPnP
    return module


async def view_of(node, agent_id: str) -> dict:
    listing = await node.tools["darkmatter_list_connections"].handler(node, {}, Session())
    return next(c for c in listing["connections"] if c["agent_id"] == agent_id)


async def watch(node, agent_id: str, predicate, timeout: float, seen: list) -> dict:
    """Poll list_connections for `agent_id` every 20 ms, recording (health, health_failures) pairs."""
    deadline = time.monotonic() + timeout
    while True:
        view = await view_of(node, agent_id)
        seen.append((view["health"], view["health_failures"]))
        if predicate(view):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last view {view}; seen {seen[-10:]}")
        await asyncio.sleep(0.02)


def health_matches(health: str, failures: int) -> bool:
    return health == ("ok" if failures == 0 else "degraded" if failures < 3 else "unreachable")


def action_lines(node) -> list[str]:
    return [line for line in node.status_lines() if line.startswith("ACTION") and "unreachable" in line]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- health loop (§6.4) ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_dead_peer_goes_degraded_then_unreachable_is_kept_and_recovers_on_return(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=UPKEEP_LOGGER)
    a = make_node(tmp_path / "a", **FAST_HEALTH)
    b = make_node(tmp_path / "b", **FAST_HEALTH)
    async with a:
        await b.start()
        try:
            b_port, b_id = b.port, b.agent_id
            await connect(a, b)
            # the loop checks a live peer successfully
            assert await until(lambda: a.connections[b_id].get("last_contact"), 5)
            assert (await view_of(a, b_id))["health"] == "ok"
            assert not action_lines(a)
        finally:
            await b.stop()

        seen: list = []
        await watch(a, b_id, lambda v: v["health_failures"] >= 3, 10, seen)
        assert {pair for pair in seen if pair[0] == "degraded"} & {("degraded", 1), ("degraded", 2)}, seen
        assert all(health_matches(*pair) for pair in seen), seen
        # more strikes: still unreachable, still one warning, still connected
        view = await watch(a, b_id, lambda v: v["health_failures"] >= 6, 10, seen)
        assert view["health"] == "unreachable"
        warnings = [r for r in caplog.records if r.name == UPKEEP_LOGGER and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
        assert b_id[:16] in warnings[0].getMessage()
        assert len(action_lines(a)) == 1
        listing = await a.tools["darkmatter_list_connections"].handler(a, {}, Session())
        assert listing["total"] == 1 and b_id in a.connections

        async with make_node(tmp_path / "b", port=b_port, **FAST_HEALTH) as b2:
            assert b2.agent_id == b_id
            view = await watch(a, b_id, lambda v: v["health_failures"] == 0, 10, seen)
            assert view["health"] == "ok"
            assert not action_lines(a)
            assert a.connections[b_id]["agent_url"] == f"http://127.0.0.1:{b_port}"


@pytest.mark.anyio
async def test_a_delivered_send_or_a_verified_inbound_message_resets_the_strikes(tmp_path):
    manual = {"DARKMATTER_HEALTH_INTERVAL": "3600"}  # rounds driven by the test only
    async with make_node(tmp_path / "a", **manual) as a:
        b = make_node(tmp_path / "b", **manual)
        async with b:
            b_port, b_id = b.port, b.agent_id
            await connect(a, b)
        for _ in range(2):
            await upkeep.health_round(a, 0.0)
        assert (await view_of(a, b_id))["health"] == "degraded"
        async with make_node(tmp_path / "b", port=b_port, **manual):
            sent = await actions.send_message(a, "are you there?", b_id)
            assert sent["deliveries"][b_id]["state"] == "delivered"
            view = await view_of(a, b_id)
            assert (view["health"], view["health_failures"]) == ("ok", 0)
        for _ in range(3):
            await upkeep.health_round(a, 0.0)
        assert (await view_of(a, b_id))["health"] == "unreachable" and action_lines(a)
        async with make_node(tmp_path / "b", port=b_port, **manual) as b3:
            sent = await actions.send_message(b3, "back again", a.agent_id)
            assert sent["deliveries"][a.agent_id]["state"] == "delivered"
            assert a.state["inbox"][-1]["content"] == "back again" and a.state["inbox"][-1]["verified"]
            view = await view_of(a, b_id)
            assert (view["health"], view["health_failures"]) == ("ok", 0)
            assert not action_lines(a)


@pytest.mark.anyio
async def test_three_health_strikes_run_peer_lookup_and_heal_a_moved_peer(tmp_path, caplog):
    """A misses B's move; with no traffic at all, A's health loop strikes 3 times and §6.2 finds B via C."""
    caplog.set_level(logging.INFO, logger=UPKEEP_LOGGER)
    async with contextlib.AsyncExitStack() as stack:
        c = await stack.enter_async_context(make_node(tmp_path / "c"))
        async with contextlib.AsyncExitStack() as first:  # then A is away while B moves
            a = await first.enter_async_context(make_node(tmp_path / "a"))
            b = await first.enter_async_context(make_node(tmp_path / "b"))
            a_port = a.port
            await connect(a, b)
            await connect(a, c)
            await connect(b, c)
        b2 = await stack.enter_async_context(make_node(tmp_path / "b"))  # same identity, new port
        assert await until(lambda: c.connections[b2.agent_id]["agent_url"] == b2.base_url, 10)
        a2 = await stack.enter_async_context(make_node(tmp_path / "a", port=a_port, **FAST_HEALTH))
        stale = a2.connections[b2.agent_id]["agent_url"]
        assert stale != b2.base_url
        assert await until(lambda: a2.connections[b2.agent_id]["agent_url"] == b2.base_url, 15)
        warnings = [r.getMessage() for r in caplog.records if r.name == UPKEEP_LOGGER
                    and r.levelno == logging.WARNING]
        assert any(b2.agent_id[:16] in w and "unreachable" in w for w in warnings), warnings
        view = await watch(a2, b2.agent_id, lambda v: v["health_failures"] == 0, 5, [])
        assert view["health"] == "ok" and view["agent_url"] == b2.base_url
        assert not a2.state["outbox"] and not a2.state["sent_messages"]  # nothing but the health loop healed it


class SlowPeers:
    """Loopback listeners that hold each request for `delay` seconds, then answer 503; count requests in flight."""

    def __init__(self, count: int, delay: float):
        self.count, self.delay = count, delay
        self.servers: list[asyncio.AbstractServer] = []
        self.in_flight = self.peak = self.requests = 0

    async def __aenter__(self) -> Self:
        for _ in range(self.count):
            self.servers.append(await asyncio.start_server(self._handle, "127.0.0.1", 0))
        return self

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in self.servers]

    async def _handle(self, reader, writer) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            self.requests += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
            body = b'{"error": "busy"}'
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aexit__(self, *exc) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()


@pytest.mark.anyio
async def test_health_round_is_concurrent_and_bounded_at_16(tmp_path):
    delay = 0.5
    env = {"DARKMATTER_HEALTH_INTERVAL": "3600", "DARKMATTER_RATE_LIMITS": "off"}  # rounds driven by the test
    async with make_node(tmp_path / "n", **env) as node, SlowPeers(20, delay) as slow:
        dead = [RawPeer(f"http://127.0.0.1:{closed_port()}") for _ in range(20)]
        hanging = [RawPeer(url) for url in slow.urls]
        for peer in dead + hanging:
            reply = await peer.connect(node)
            assert reply.get("auto_accepted") is True, reply
        assert len(node.connections) == 40

        started = time.monotonic()
        await asyncio.wait_for(upkeep.health_round(node, 0.0), 30)
        elapsed = time.monotonic() - started

        # one after the other this would take 20 x 0.5 s; 16 at once takes two waves (~1 s)
        assert elapsed < 6.0, elapsed
        assert slow.requests == 20
        assert 2 <= slow.peak <= 16, slow.peak
        for peer in dead + hanging:
            view = await view_of(node, peer.agent_id)
            assert (view["health"], view["health_failures"]) == ("degraded", 1), view
            assert peer.agent_id in node.connections


# --- IP lookup and UPnP gates on a loopback bind (§6.5, §6.6) -----------------------------------------


@pytest.mark.anyio
async def test_loopback_node_never_contacts_the_ip_echo_nor_a_gateway(tmp_path, monkeypatch):
    gateway = fake_miniupnpc()
    monkeypatch.setitem(sys.modules, "miniupnpc", gateway)
    echo = await Echo().start()
    try:
        echo.answers["/ip"] = {"ip": "127.0.0.7"}
        env = {"DARKMATTER_IP_LOOKUP_URL": echo.url("/ip"), "DARKMATTER_ADDRESS_INTERVAL": "0.05",
               "DARKMATTER_UPNP": "true"}
        async with make_node(tmp_path / "n", **env) as node:
            assert node.bind_is_loopback
            await asyncio.sleep(1.0)  # twenty address-loop intervals
            assert node.base_url == f"http://127.0.0.1:{node.port}"
            assert "upnp_port" not in node.state and "lan_url" not in node.state
        assert sum(echo.hits.values()) == 0, dict(echo.hits)
        assert gateway.calls == []
    finally:
        await echo.stop()


# --- address change with a wildcard bind, inside a network namespace (§6.5, §6.3, §6.6) ------------------


async def netns_driver(workdir: Path) -> dict:
    """Runs inside a namespace with only ``lo``: wildcard-bound nodes are reachable from nowhere else."""
    out: dict = {}
    gateway = fake_miniupnpc(conflicts=2)
    sys.modules["miniupnpc"] = gateway
    echo = await Echo().start()
    echo.answers["/a"] = {"ip": "not-an-ip"}
    echo.answers["/b"] = {"ip": "127.0.0.5"}
    echo.answers["/c"] = {"ip": "127.0.0.6"}
    fast = {"DARKMATTER_ADDRESS_INTERVAL": "0.1"}
    a = make_node(workdir / "a", DARKMATTER_HOST="0.0.0.0", DARKMATTER_IP_LOOKUP_URL=echo.url("/a"),
                  DARKMATTER_UPNP="false", **fast)
    b = make_node(workdir / "b", DARKMATTER_IP_LOOKUP_URL=echo.url("/b"), DARKMATTER_UPNP="true", **fast)
    c = make_node(workdir / "c", DARKMATTER_HOST="0.0.0.0", DARKMATTER_PUBLIC_URL="http://127.0.0.9:8999",
                  DARKMATTER_IP_LOOKUP_URL=echo.url("/c"), DARKMATTER_UPNP="false", **fast)
    try:
        async with a, b, c:
            await until(lambda: echo.hits["/a"] >= 3, 10)
            out["garbage"] = {"hits": echo.hits["/a"], "a_base_url": a.base_url, "a_port": a.port}
            await connect(b, a)
            out["b_url_for_a_initial"] = b.connections[a.agent_id]["agent_url"]
            for ip in ("127.0.0.7", "127.0.0.8"):
                echo.answers["/a"] = {"ip": ip}
                want = f"http://{ip}:{a.port}"
                moved = await until(lambda want=want: b.connections[a.agent_id]["agent_url"] == want, 10)
                content = f"hello at {ip}"
                sent = await actions.send_message(b, content, a.agent_id)
                arrived = await until(lambda text=content: any(m["content"] == text for m in a.state["inbox"]), 10)
                entry = next((m for m in a.state["inbox"] if m["content"] == content), {})
                out[ip] = {"moved": moved, "a_base_url": a.base_url,
                           "b_url_for_a": b.connections[a.agent_id]["agent_url"],
                           "a_self_url_for_b": a.connections[b.agent_id]["self_url"],
                           "last_peer_update_ts": b.connections[a.agent_id]["last_peer_update_ts"],
                           "delivery": sent["deliveries"][a.agent_id]["state"], "arrived": arrived,
                           "verified": entry.get("verified")}
            await asyncio.sleep(0.5)
            out["b_base_url"], out["b_port"] = b.base_url, b.port
            out["c_base_url"] = c.base_url
            out["gateway_calls_before_d"] = list(gateway.calls)

        # UPnP on, for a wildcard bind: the mapping's external port is advertised and deleted at shutdown
        echo.answers["/d"] = {"ip": "127.0.0.9"}
        d_env = {"DARKMATTER_HOST": "0.0.0.0", "DARKMATTER_IP_LOOKUP_URL": echo.url("/d"), **fast}
        async with make_node(workdir / "d", DARKMATTER_UPNP="true", **d_env) as d:
            mapped = d.state.get("upnp_port")
            await until(lambda: d.base_url == f"http://127.0.0.9:{mapped}", 10)
            out["upnp"] = {"port": d.port, "upnp_port": mapped, "base_url": d.base_url,
                           "calls_running": list(gateway.calls)}
            d_port = d.port
        out["upnp"]["calls_after_stop"] = list(gateway.calls)

        # restart: the gateway now refuses every mapping; the node must advertise its own port again
        gateway2 = fake_miniupnpc(conflicts=99)
        sys.modules["miniupnpc"] = gateway2
        hits = echo.hits["/d"]
        async with make_node(workdir / "d", port=d_port, DARKMATTER_UPNP="true", **d_env) as d2:
            await until(lambda: echo.hits["/d"] >= hits + 3, 10)
            out["upnp_failed_restart"] = {"port": d2.port, "base_url": d2.base_url,
                                          "upnp_port": d2.state.get("upnp_port"), "calls": list(gateway2.calls)}
        out["hits"] = dict(echo.hits)
    finally:
        await echo.stop()
    return out


@pytest.fixture
def netns():
    name = f"dmupkeep{os.getpid()}{secrets.token_hex(3)}"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        skip_unless_ci(f"cannot create a network namespace: {exc}")
    if made.returncode != 0:
        skip_unless_ci(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=30,
                       capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


@pytest.mark.netns
def test_wildcard_node_follows_the_ip_echo_and_tells_its_connections(tmp_path, netns):
    run = subprocess.run(["ip", "netns", "exec", netns, sys.executable, __file__, "--netns-driver", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout)
    a_port = out["garbage"]["a_port"]

    # an answer that is not an IP is ignored (and, with only lo, there is no LAN address either)
    assert out["garbage"]["hits"] >= 3
    assert out["garbage"]["a_base_url"] == f"http://127.0.0.1:{a_port}"
    assert out["b_url_for_a_initial"] == f"http://127.0.0.1:{a_port}"
    # A's URL follows the echo; B verified and stored each move; messages keep arriving, signed
    stamps = []
    for ip in ("127.0.0.7", "127.0.0.8"):
        step = out[ip]
        want = f"http://{ip}:{a_port}"
        assert step["moved"], step
        assert step["a_base_url"] == want and step["b_url_for_a"] == want and step["a_self_url_for_b"] == want
        assert step["delivery"] == "delivered" and step["arrived"] and step["verified"] is True, step
        stamps.append(step["last_peer_update_ts"])
    assert stamps[0] and stamps[1] and stamps[0] < stamps[1]
    # loopback B and public-URL C never ask the echo service nor advertise what it says
    assert out["hits"].get("/b", 0) == 0 and out["hits"].get("/c", 0) == 0, out["hits"]
    assert out["b_base_url"] == f"http://127.0.0.1:{out['b_port']}"
    assert out["c_base_url"] == "http://127.0.0.9:8999"
    # with DARKMATTER_UPNP=false (A, C) or a loopback bind (B) the UPnP library is never used
    assert out["gateway_calls_before_d"] == []

    # §6.6: a random external port in 30000-60000, "DarkMatter mesh", retried on conflict, deleted at shutdown
    upnp = out["upnp"]
    adds = [call for call in upnp["calls_running"] if call[0] == "add"]
    assert [call[0] for call in upnp["calls_running"][:3]] == ["UPnP", "discover", "selectigd"]
    assert len(adds) == 3  # two conflicts, then a mapping
    assert all(30000 <= call[1] <= 60000 and call[2] == "TCP" and call[4] == upnp["port"]
               and call[5] == "DarkMatter mesh" for call in adds), adds
    assert upnp["upnp_port"] == adds[-1][1]
    assert upnp["base_url"] == f"http://127.0.0.9:{upnp['upnp_port']}"
    assert upnp["calls_after_stop"][-1] == ["delete", upnp["upnp_port"], "TCP"]
    assert not any(call[0] == "delete" for call in upnp["calls_running"][3:])
    # when mapping fails (five tries at most), the old external port is not advertised
    failed = out["upnp_failed_restart"]
    assert len([call for call in failed["calls"] if call[0] == "add"]) == 5
    assert (failed["upnp_port"], failed["base_url"]) == (None, f"http://127.0.0.9:{failed['port']}"), failed


if __name__ == "__main__" and sys.argv[1:2] == ["--netns-driver"]:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = asyncio.run(asyncio.wait_for(netns_driver(Path(sys.argv[2])), 90))
    sys.stdout.write(json.dumps(result) + "\n")
