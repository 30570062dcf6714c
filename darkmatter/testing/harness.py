"""A mesh of real nodes over one transport, for tests that must hold whatever carries the protocol.

:class:`Harness` starts nodes that speak only the transport under test, connects them, restarts or kills
them, and sends raw requests to them through that same transport, so a conformance case is written once
and runs over ``memory``, ``http`` and ``webrtc`` (``pytest --dm-transport=...``).

* ``memory``: the kernel, the built-in plugins and a :class:`~darkmatter.testing.memory.MemoryTransport`;
  no socket at all (URLs ``memory://nodeN``).
* ``http``: ``http_transport`` on 127.0.0.1, free ports.
* ``webrtc``: ``http_transport`` and ``webrtc_transport`` on 127.0.0.2 (run it inside a network namespace
  whose ``lo`` carries 127.0.0.2: aiortc never offers 127.0.0.1); every connection is upgraded to a data
  channel after it is made, so messages travel over the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from darkmatter.mesh.transport import Reply
from darkmatter.node import Node
from darkmatter.testing import connect, make_node
from darkmatter.testing.memory import MemoryNetwork, MemoryTransport
from darkmatter.tools import Session

TRANSPORTS = ("memory", "http", "webrtc")


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                   what: str = "condition") -> Any:
    """Poll ``predicate`` (a function, or one returning an awaitable) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


class Harness:
    """Nodes over one transport, in ``directory``; use as ``async with Harness(...) as dm``."""

    def __init__(self, directory: Path, transport: str = "memory"):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r} (known: {', '.join(TRANSPORTS)})")
        self.directory = Path(directory)
        self.transport = transport
        self.network = MemoryNetwork() if transport == "memory" else None
        self.nodes: list[Node] = []
        self._count = 0
        self._probe: MemoryTransport | None = None
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Harness:
        if self.network is not None:
            self._probe = MemoryTransport(self.network, "probe", None)
        else:
            self._http = httpx.AsyncClient(trust_env=False, timeout=15.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for node in reversed(self.nodes):
            if node.started:
                await node.stop()
        if self._http is not None:
            await self._http.aclose()

    # --- nodes -----------------------------------------------------------------------------------

    def build(self, name: str | None = None, *, port: int = 0, **env: str) -> Node:
        """A node of this harness's transport, not started (``name`` picks its state directory)."""
        if name is None:
            name = f"node{self._count}"
            self._count += 1
        directory = self.directory / name
        if self.transport == "memory":
            env.setdefault("DARKMATTER_PUBLIC_URL", self.network.url(name))
            return make_node(directory, plugins="", extra=[self.network.plugin(name)], **env)
        if self.transport == "webrtc":
            env.setdefault("DARKMATTER_HOST", "127.0.0.2")
            return make_node(directory, port=port, plugins="http_transport,webrtc_transport", **env)
        return make_node(directory, port=port, plugins="http_transport", **env)

    async def start(self, node: Node) -> Node:
        await node.start(serve=self.transport != "memory")
        self.nodes.append(node)
        return node

    async def node(self, name: str | None = None, **env: str) -> Node:
        """A started node."""
        return await self.start(self.build(name, **env))

    async def mesh(self, n: int, connect_as: str = "chain", **env: str) -> list[Node]:
        """``n`` started nodes, connected ``chain`` (0-1, 1-2, ...), ``full`` or ``none``."""
        nodes = [await self.node(**env) for _ in range(n)]
        pairs = []
        if connect_as == "chain":
            pairs = list(zip(nodes, nodes[1:]))
        elif connect_as == "full":
            pairs = [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:]]
        for a, b in pairs:
            await self.connect(a, b)
        return nodes

    async def connect(self, a: Node, b: Node) -> dict:
        """a → b (b must auto-accept); on ``webrtc`` the connection is then upgraded to a data channel."""
        result = await connect(a, b)
        if self.transport == "webrtc":
            await self.upgrade(a, b)
        return result

    async def upgrade(self, a: Node, b: Node) -> None:
        tool = a.tools["darkmatter_upgrade_webrtc"]
        await tool.handler(a, {"agent_id": b.agent_id}, Session())
        await wait_for(lambda: a.connections[b.agent_id].get("transport") == "webrtc"
                       and b.connections.get(a.agent_id, {}).get("transport") == "webrtc",
                       what="a WebRTC data channel on both sides")

    def name_of(self, node: Node) -> str:
        return Path(node.config.state_file).parent.name

    async def restart(self, node: Node, *, move: bool = False) -> Node:
        """Stop ``node`` and start it again on the same state; ``move`` gives it a new address."""
        name = self.name_of(node)
        port = node.port
        await node.stop()
        self.nodes.remove(node)
        env = {}
        if move and self.transport == "memory":
            env["DARKMATTER_PUBLIC_URL"] = self.network.url(name + "-moved")
            fresh = make_node(self.directory / name, plugins="", extra=[self.network.plugin(name + "-moved")],
                              **env)
            return await self.start(fresh)
        return await self.start(self.build(name, port=0 if move else port))

    async def kill(self, node: Node) -> None:
        """The node stops answering, as a crashed host would (its state stays on disk)."""
        if self.network is not None:
            self.network.kill(self.name_of(node))
        else:
            await node.stop()

    async def revive(self, node: Node) -> Node:
        if self.network is not None:
            self.network.revive(self.name_of(node))
            return node
        self.nodes.remove(node)
        return await self.start(self.build(self.name_of(node), port=node.port))

    # --- raw requests through the transport under test --------------------------------------------

    def raw_url(self, name: str = "raw") -> str:
        """An address for a hand-driven peer (nothing answers there)."""
        return f"memory://{name}" if self.transport == "memory" else f"http://127.0.0.1:9/{name}"

    async def request(self, method: str, url: str, body: Any = None, headers: dict | None = None) -> Reply:
        if self._probe is not None:
            return await self._probe.request(method, url, json_body=body, headers=headers)
        assert self._http is not None
        try:
            if method == "POST":
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                response = await self._http.post(url, content=content, headers={
                    "Content-Type": "application/json", **(headers or {})})
            else:
                response = await self._http.get(url, headers=headers)
        except httpx.HTTPError as exc:
            return Reply(None, error=str(exc), error_kind="connect")
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        return Reply(response.status_code, parsed)

    async def post(self, node: Node, path: str, body: Any, headers: dict | None = None) -> Reply:
        return await self.request("POST", node.base_url + path, body, headers)

    async def get(self, node: Node, path: str, headers: dict | None = None) -> Reply:
        return await self.request("GET", node.base_url + path, None, headers)


@contextlib.asynccontextmanager
async def harness(directory: Path, transport: str = "memory"):
    async with Harness(directory, transport) as dm:
        yield dm
