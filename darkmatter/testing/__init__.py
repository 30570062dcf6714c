"""Test harness for DarkMatter and its plugins: real nodes on loopback, in this process.

    async with node_context(tmp_path) as node: ...          # one started node on a free port
    async with mesh(tmp_path, 3, connect="chain") as nodes:  # A-B-C, connected over HTTP
    async with client(node) as http: await http.get("/__darkmatter__/status")
    with LoopThread() as loop: node = loop.start_node(tmp_path / "a")   # for blocking tests (browser, CLI)

Every node gets its own state directory under ``tmp_path``, a free port, discovery, UPnP and the IP
lookup off, and only the plugins asked for (default: ``http_transport``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, NoReturn, TypeVar

import httpx

from darkmatter.config import Config
from darkmatter.mesh import outbound
from darkmatter.node import Node

DEFAULT_PLUGINS = "http_transport"
T = TypeVar("T")


def in_ci() -> bool:
    """True under ``CI=true`` (what CI sets; it runs as root with node and npm installed)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_unless_ci(reason: str) -> NoReturn:
    """Skip a test whose prerequisite (root for network namespaces or mounts, node/npm) is missing here;
    under ``CI=true``, where every prerequisite is provided, fail instead: a skip there hides a regression."""
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (CI=true: this test must run in CI, not skip)", pytrace=False)
    pytest.skip(reason)


def env_for_tests(home: Path, **env: str) -> dict[str, str]:
    """An environment for a test node: isolated HOME, no discovery, UPnP or IP lookup."""
    base = {
        "HOME": str(home),
        "DARKMATTER_DISCOVERY": "false",
        "DARKMATTER_UPNP": "false",
        "DARKMATTER_IP_LOOKUP_URL": "",
        "DARKMATTER_STUN_SERVERS": "",
        "DARKMATTER_TRANSPORT": "http",
    }
    base.update(env)
    return base


def make_config(directory: Path, *, port: int = 0, plugins: str | None = DEFAULT_PLUGINS,
                **env: str) -> Config:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    environ = env_for_tests(directory, **env)
    environ.setdefault("DARKMATTER_STATE_FILE", str(directory / "state.json"))
    return Config.from_env(environ, port=port, plugins=plugins)


def make_node(directory: Path, *, port: int = 0, plugins: str | None = DEFAULT_PLUGINS,
              extra: Iterable = (), **env: str) -> Node:
    """A node that is built but not started (``await node.start()`` or ``async with node``)."""
    return Node(make_config(directory, port=port, plugins=plugins, **env), plugins=extra)


@contextlib.asynccontextmanager
async def node_context(directory: Path, **kwargs) -> AsyncIterator[Node]:
    node = make_node(directory, **kwargs)
    async with node:
        yield node


async def connect(a: Node, b: Node) -> dict:
    """Connect a → b over the mesh (b must auto-accept, e.g. be genesis). Returns the tool result."""
    result = await outbound.request_connection(a, b.base_url)
    if result.get("status") != "connected":
        raise AssertionError(f"connection {a.agent_id[:8]} -> {b.agent_id[:8]} failed: {result}")
    return result


@contextlib.asynccontextmanager
async def mesh(directory: Path, n: int, *, connect_as: str = "chain", **kwargs) -> AsyncIterator[list[Node]]:
    """Start ``n`` nodes; ``connect_as`` is ``chain`` (0-1, 1-2, ...), ``full`` or ``none``."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(node_context(Path(directory) / f"node{i}", **kwargs))
                 for i in range(n)]
        if connect_as == "chain":
            for a, b in zip(nodes, nodes[1:]):
                await connect(a, b)
        elif connect_as == "full":
            for i, a in enumerate(nodes):
                for b in nodes[i + 1:]:
                    await connect(a, b)
        yield nodes


def client(node: Node, **kwargs) -> httpx.AsyncClient:
    """An HTTP client aimed at the node's port (a real socket, as any peer)."""
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}", trust_env=False, **kwargs)


class RawPeer:
    """A hand-driven peer holding its own Ed25519 key: speaks the wire protocol directly, so tests
    can send exactly the bytes a 0.2 node, a 0.3 node or an attacker would."""

    def __init__(self, url: str = "http://127.0.0.1:9", *, agent_id: str | None = None, keyed: bool = True):
        from darkmatter.identity import Identity

        self.identity = Identity.generate() if keyed else None
        self.url = url
        self.agent_id = agent_id or (self.identity.public_key_hex if self.identity else None)

    def connection_request(self, *, sign: bool = True, **overrides) -> dict:
        from darkmatter.identity import v2_string
        from darkmatter.wire import now_iso

        body = {"from_agent_id": self.agent_id, "from_agent_url": self.url, "from_agent_bio": "raw peer",
                "from_agent_display_name": "raw", "protocol_version": "0.3" if sign else None}
        if self.identity is not None:
            body["from_agent_public_key_hex"] = self.identity.public_key_hex
        if sign and self.identity is not None:
            body["timestamp"] = now_iso()
            body["signature_v2_hex"] = self.identity.sign(v2_string(
                "connection_request", self.agent_id, self.url, self.identity.public_key_hex, body["timestamp"]))
        body.update(overrides)
        return body

    def message(self, node: Node, content: str = "hello", *, message_id: str | None = None,
                webhook: str | None = None, hops: int = 10, metadata: dict | None = None, v1: bool = True,
                v2: bool = True, timestamp: str | None = None) -> dict:
        from darkmatter.identity import v1_string, v2_message
        from darkmatter.wire import new_message_id, now_iso

        message_id = message_id or new_message_id()
        webhook = webhook or f"{self.url}/__darkmatter__/webhook/{message_id}"
        ts = timestamp or now_iso()
        body = {"message_id": message_id, "content": content, "webhook": webhook, "hops_remaining": hops,
                "from_agent_id": self.agent_id, "metadata": metadata or {}}
        if self.identity is not None and (v1 or v2):
            body["timestamp"] = ts
            body["from_public_key_hex"] = self.identity.public_key_hex
            if v1:
                body["signature_hex"] = self.identity.sign(v1_string(self.agent_id, message_id, ts, content))
            if v2:
                body["signature_v2_hex"] = self.identity.sign(v2_message(
                    self.agent_id, node.agent_id, message_id, ts, hops, webhook, content, metadata or {}))
        return body

    async def post(self, node: Node, path: str, body, **kwargs) -> httpx.Response:
        async with client(node) as http:
            if isinstance(body, (bytes, str)):
                return await http.post(path, content=body, headers={"Content-Type": "application/json"}, **kwargs)
            return await http.post(path, json=body, **kwargs)

    async def connect(self, node: Node, **overrides) -> dict:
        response = await self.post(node, "/__darkmatter__/connection_request", self.connection_request(**overrides))
        return response.json()


class PeerServer:
    """A tiny HTTP server on 127.0.0.1 standing in for a peer that holds ``identity``: it answers the §6.1
    challenge at its own URL (signing ``http://127.0.0.1:<port>``), serves ``document`` (a well-known
    document, or None for 404) and answers 404 to everything else. ``requests`` records (method, path).

        async with PeerServer(identity, document) as peer: ...   # peer.url, peer.port
    """

    def __init__(self, identity: Any = None, document: Any = None):
        self.identity = identity
        self.document = document
        self.requests: list[tuple[str, str]] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> PeerServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 5)

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        import json

        from darkmatter.identity import v2_string
        from darkmatter.wire import now_iso

        if method == "POST" and path == "/__darkmatter__/challenge" and self.identity is not None:
            try:
                asked = json.loads(body)
            except ValueError:
                return 400, {"error": "Invalid JSON body", "code": "invalid_json"}
            if asked.get("agent_id") != self.identity.public_key_hex:
                return 404, {"error": "unknown agent", "code": "unknown_agent"}
            ts = now_iso()
            return 200, {"agent_id": asked["agent_id"], "url": self.url, "timestamp": ts,
                         "signature_v2_hex": self.identity.sign(v2_string(
                             "challenge", asked["nonce"], asked["agent_id"], asked["from_agent_id"], self.url, ts))}
        if method == "GET" and path == "/.well-known/darkmatter.json" and self.document is not None:
            return 200, self.document
        return 404, {"error": "Not found", "code": "not_found"}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import json

        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            body = await asyncio.wait_for(reader.readexactly(min(length, 1 << 20)), 5) if length else b""
            self.requests.append((method, path))
            status, answer = self.answer(method, path, body)
            data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (status, len(data)) + data)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


class ChannelListener:
    """Records a node's channel notifications (docs/protocol.md §12.5) for an SDK client:
    ``mcp.Client(..., extensions=[listener.extension()])``, then ``await listener.next()``.

    ``received`` holds the params (``{"content": ..., "meta": {...}}``) in arrival order."""

    METHOD = "notifications/claude/channel"

    def __init__(self) -> None:
        self.received: list[dict] = []
        self._count = 0

    def extension(self):
        from mcp.client.extension import ClientExtension, NotificationBinding
        from pydantic import BaseModel, ConfigDict

        listener = self

        class Params(BaseModel):
            model_config = ConfigDict(extra="allow")
            content: str
            meta: dict[str, str] | None = None

        async def on_params(params: Params) -> None:
            listener.received.append(params.model_dump())

        class Extension(ClientExtension):
            identifier = "dev.darkmatter/channel-listener"

            def notifications(self):
                return [NotificationBinding(method=ChannelListener.METHOD, params_type=Params, handler=on_params)]

        return Extension()

    async def next(self, timeout: float = 10.0) -> dict:
        """The next notification not yet returned by ``next``; TimeoutError after ``timeout`` seconds."""
        import anyio

        with anyio.fail_after(timeout):
            while len(self.received) <= self._count:
                await anyio.sleep(0.02)
        self._count += 1
        return self.received[self._count - 1]


class LoopThread:
    """Real nodes on an event loop in a background thread, for tests whose own code blocks (a browser driven
    by Selenium, a CLI subprocess). ``run(coro)`` runs a coroutine on that loop and returns its result;
    ``call(fn)`` runs a plain function there (read a node's state without racing the loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.nodes: list[Node] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="darkmatter-test-loop", daemon=True)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        async def wrapped() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def start_node(self, directory: Path, **kwargs) -> Node:
        """Build and start a node (``make_node`` arguments) on the loop; it is stopped at ``close()``."""
        node = make_node(directory, **kwargs)
        self.run(node.start())
        self.nodes.append(node)
        return node

    def stop_node(self, node: Node) -> None:
        self.run(node.stop())
        if node in self.nodes:
            self.nodes.remove(node)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                self.run(node.stop())
        self.nodes.clear()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
