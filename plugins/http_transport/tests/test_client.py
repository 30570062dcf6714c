"""The transport's own HTTP/1.1 client for plain ``http://`` peers: kept-alive connections, framing, and
connections the peer closed while they were idle."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from darkmatter_http_transport.client import Net

pytestmark = pytest.mark.anyio


class KeepAliveServer:
    """Answers every request on a connection with a JSON body (Content-Length, or chunked when asked), and keeps
    the connection open unless ``close_after`` requests were served on it; then it closes it *without* saying
    so (no ``Connection: close``), as a server whose keep-alive timer ran out does."""

    def __init__(self, close_after: int | None = None, chunked: bool = False):
        self.close_after = close_after
        self.chunked = chunked
        self.connections = 0
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> KeepAliveServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        self.connections += 1
        served = 0
        try:
            while self.close_after is None or served < self.close_after:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                self.requests.append((method, path, headers, body))
                answer = json.dumps({"n": len(self.requests), "echo": body.decode() or None}).encode()
                if self.chunked:
                    half = len(answer) // 2
                    payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (answer[:half], answer[half:])) + b"0\r\n\r\n"
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + payload)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(answer), answer))
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(asyncio.current_task())
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def net() -> Net:
    return Net(lambda: True, lambda url: True)


@pytest.mark.parametrize("chunked", [False, True])
async def test_requests_to_one_peer_share_one_kept_alive_connection(chunked):
    client = net()
    async with KeepAliveServer(chunked=chunked) as server:
        url = f"http://localhost:{server.port}/__darkmatter__/message"
        for i in range(5):
            reply = await client.request("POST", url, json_body={"i": i})
            assert reply.status == 200 and reply.ok, reply
            assert reply.body == {"n": i + 1, "echo": json.dumps({"i": i}, separators=(",", ":"))}
        assert server.connections == 1
        method, path, headers, _ = server.requests[-1]
        assert (method, path) == ("POST", "/__darkmatter__/message")
        assert headers["host"] == f"localhost:{server.port}" and headers["content-type"] == "application/json"
    await client.aclose()


async def test_a_connection_the_peer_closed_while_idle_is_not_a_failed_request():
    """The peer closes each connection after one answer without saying so. Whether the client notices the
    close before reusing the connection or only when the reused connection yields nothing, every request
    gets its answer, on a new connection each time."""
    client = net()
    async with KeepAliveServer(close_after=1) as server:
        url = f"http://127.0.0.1:{server.port}/__darkmatter__/status"
        for i in range(6):
            reply = await client.request("GET", url)
            assert reply.status == 200 and reply.body["n"] == i + 1, reply
            if i % 2:
                await asyncio.sleep(0.05)  # sometimes the close is seen while idle, sometimes only on reuse
        assert server.connections == 6
    await client.aclose()


async def test_a_peer_that_accepts_and_closes_at_once_is_a_reset_not_a_hang():
    async def slam(reader, writer):
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = net()
    try:
        reply = await client.request("GET", f"http://127.0.0.1:{port}/x", timeout=5)
        assert reply.status is None and reply.error_kind == "reset", reply
        refused = await client.request("GET", "http://127.0.0.1:9/x", timeout=5)
        assert refused.status is None and refused.error_kind == "connect", refused
    finally:
        server.close()
        await client.aclose()


FIRST_REQUESTS = r'''
import asyncio, importlib.abc, importlib.util, sys, tempfile, time
from pathlib import Path
from darkmatter.testing import make_node
from darkmatter_http_transport import transport_of

CLIENT = "darkmatter_http_transport.client"


class SlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the client module as usual, but executes it 0.3 s late: the window in which sys.modules holds
    it half initialized, as on a loaded machine, made wide enough to hit."""

    def find_spec(self, name, path, target=None):
        if name != CLIENT:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        self.real = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        time.sleep(0.3)
        self.real.exec_module(module)


sys.meta_path.insert(0, SlowImport())

async def main():
    node = make_node(Path(tempfile.mkdtemp()), plugins="http_transport")
    transport = transport_of(node)
    assert CLIENT not in sys.modules, "the client module must not be loaded before the first request"
    tasks, half_loaded = [], 0
    for _ in range(400):  # one first request every millisecond until the import is done (at most 400)
        tasks.append(asyncio.ensure_future(transport.check("http://127.0.0.1:9/x", False)))
        await asyncio.sleep(0.001)
        module = sys.modules.get(CLIENT)
        if module is not None and not hasattr(module, "Net"):
            half_loaded += 1
        if transport.net is not None:
            break
    failures = [repr(e) for e in await asyncio.gather(*tasks, return_exceptions=True) if e is not None]
    print(len(tasks), half_loaded, failures)

asyncio.run(main())
'''


def test_requests_made_while_the_client_is_still_being_imported_wait_for_it(tmp_path):
    """The client module loads at the first request, in a thread; requests started meanwhile (while
    sys.modules holds it half initialized) wait for that import instead of failing with AttributeError."""
    import subprocess
    import sys

    from darkmatter.testing import env_for_tests

    done = subprocess.run([sys.executable, "-c", FIRST_REQUESTS], capture_output=True, text=True, timeout=120,
                          env=env_for_tests(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    started, half_loaded, failures = done.stdout.strip().rsplit("\n", 1)[-1].split(" ", 2)
    assert int(started) > 1 and int(half_loaded) >= 1, done.stdout  # some started while it was half loaded
    assert failures == "[]", failures
