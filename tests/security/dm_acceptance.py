"""Shared harness of the security and reliability acceptance suites (tests/security, tests/reliability).

* :class:`NodeProcess` — ``python -m darkmatter run`` as a real subprocess on a loopback port, for kill -9,
  restart, SIGSTOP and memory cases.
* :class:`ThreadNode` — an in-process node running on its own event loop in a thread, so that synchronous
  code (hypothesis) can drive it over real sockets and snapshot its state between requests.
* :class:`CaptureServer` — a tiny HTTP/1.1 server on another loopback port that records every request and
  answers as the test says (status, redirects, slow drips, huge bodies).
* :func:`raw_http` — one request as exact bytes on a fresh socket (odd paths, broken headers, bodies).
* :class:`ResolverLoop` — an event loop whose name resolution the test scripts for chosen names (rebinding).
* :func:`count_reads` — the body bytes a node's HTTP client actually read, per peer.

Every wait here is bounded in time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from darkmatter.testing import env_for_tests, make_node


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def figure(name: str, value: Any) -> None:
    """Record a measured figure (run pytest with -s to see them; they are also in the captured output)."""
    print(f"FIGURE {name}: {value}")


# --- subprocess nodes ------------------------------------------------------------------------------


class NodeProcess:
    """``python -m darkmatter run`` in HTTP mode on a fixed loopback port with an explicit environment."""

    def __init__(self, home: Path, *, port: int | None = None, state_file: Path | None = None,
                 plugins: str = "http_transport", log_level: str = "info", umask: str | None = None,
                 **env: str):
        self.home = Path(home)
        self.umask = None if umask is None else int(umask, 8)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.state_file = Path(state_file or self.home / "state.json")
        self.log_path = self.home / "node.log"
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    **env_for_tests(self.home),
                    "DARKMATTER_PORT": str(self.port), "DARKMATTER_STATE_FILE": str(self.state_file),
                    "DARKMATTER_PLUGINS": plugins, "DARKMATTER_BOOTSTRAP": "false",
                    "DARKMATTER_LOG_LEVEL": log_level, "PYTHONUNBUFFERED": "1"}
        self.env.update(env)
        if not self.env.get("DARKMATTER_STATE_FILE"):
            self.env.pop("DARKMATTER_STATE_FILE", None)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._log_mark = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> subprocess.Popen:
        self._log_mark = len(self.log_text())
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "darkmatter", "run"], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=str(self.home), preexec_fn=self._preexec)
        finally:
            log.close()
        self.starts += 1
        return self.proc

    def _preexec(self) -> None:
        if self.umask is not None:
            os.umask(self.umask)

    async def start(self, timeout: float = 30.0) -> dict:
        """Spawn and wait until ``/__darkmatter__/status`` answers; returns that status."""
        self.spawn()
        return await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 30.0) -> dict:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False, timeout=1.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    reply = await http.get(self.url + "/__darkmatter__/status")
                    # NOTE: "serving" is logged once the runner's SIGTERM handler is installed; a SIGTERM
                    # before that would kill the process without a clean stop.
                    if reply.status_code == 200 and " serving " in self.log_text()[self._log_mark:]:
                        return reply.json()
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.03)
        raise TimeoutError(f"node on {self.port} not ready after {timeout} s: {self.log_tail()}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.02)
        return None

    async def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        assert await self.wait_exit(10) is not None

    async def stop(self) -> int | None:
        """SIGTERM (after SIGCONT, in case it is stopped), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        code = await self.wait_exit(15)
        if code is None:
            self.signal(signal.SIGKILL)
            code = await self.wait_exit(5)
        return code

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def run_cli(home: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """A one-shot ``python -m darkmatter ...`` (e.g. ``run`` that is expected to fail at start-up)."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env_for_tests(Path(home)),
            "DARKMATTER_BOOTSTRAP": "false", "DARKMATTER_PLUGINS": "http_transport", **env}
    return subprocess.run([sys.executable, "-m", "darkmatter", *args], env=full, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=str(home))


# --- an in-process node on its own loop --------------------------------------------------------------


class ThreadNode:
    """A started in-process node whose event loop runs in a background thread."""

    def __init__(self, directory: Path, **kwargs):
        self.directory = Path(directory)
        self.kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="thread-node", daemon=True)
        self.node = None

    def run(self, coro: Awaitable, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run a plain function on the node's loop (so it sees a consistent state)."""
        async def wrapper():
            return fn()
        return self.run(wrapper(), timeout)

    def snapshot(self) -> str:
        return self.call(lambda: json.dumps(self.node.state, sort_keys=True, default=str))

    def __enter__(self) -> ThreadNode:
        self.thread.start()

        async def start():
            node = make_node(self.directory, **self.kwargs)
            await node.start()
            return node
        self.node = self.run(start())
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.node is not None:
                self.run(self.node.stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


# --- raw HTTP ----------------------------------------------------------------------------------------


@dataclass
class RawReply:
    status: int | None
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


def _parse_reply(data: bytes) -> RawReply:
    if not data:
        return RawReply(None, {}, b"")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return RawReply(None, {}, data)
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                break
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return RawReply(status, headers, body)


def raw_http_sync(port: int, method: str, target: bytes | str, *, body: bytes = b"",
                  headers: dict[str, str] | None = None, timeout: float = 15.0) -> RawReply:
    """Send one request exactly as given (the path is not normalized or encoded) and read the reply."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    hdrs = {"Host": f"127.0.0.1:{port}", "Connection": "close", "Content-Type": "application/json"}
    if body or method == "POST":
        hdrs["Content-Length"] = str(len(body))
    hdrs.update(headers or {})
    head = method.encode() + b" " + target + b" HTTP/1.1\r\n"
    head += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in hdrs.items() if v is not None) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return _parse_reply(b"".join(chunks))


async def raw_http(port: int, method: str, target: bytes | str, **kwargs) -> RawReply:
    return await asyncio.to_thread(raw_http_sync, port, method, target, **kwargs)


# --- a capture server ----------------------------------------------------------------------------------


@dataclass
class Captured:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


@dataclass
class Answer:
    status: int = 200
    body: Any = field(default_factory=lambda: {"success": True})
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0          # seconds before anything is sent
    drip: float | None = None   # send the body one byte every `drip` seconds
    huge: int | None = None     # stream this many bytes of a JSON string (no Content-Length when chunked)
    chunked: bool = False


Handler = Callable[[Captured], Answer]


class CaptureServer:
    """An HTTP/1.1 server on a loopback address (127.0.0.1 unless told) that records each request and
    answers from ``handler``."""

    def __init__(self, handler: Handler | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self.handler = handler or (lambda req: Answer())
        self.requests: list[Captured] = []
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    async def __aenter__(self) -> CaptureServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        self.connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            body = await asyncio.wait_for(reader.readexactly(min(length, 4 << 20)), 30) if length else b""
            request = Captured(method, path, headers, body)
            self.requests.append(request)
            answer = self.handler(request)
            await self._answer(writer, answer)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ValueError,
                asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(asyncio.current_task())
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _answer(self, writer: asyncio.StreamWriter, answer: Answer) -> None:
        if answer.delay:
            await asyncio.sleep(answer.delay)
        reason = {200: "OK", 302: "Found", 404: "Not Found", 500: "Error"}.get(answer.status, "X")
        headers = {"Content-Type": "application/json", "Connection": "close", **answer.headers}
        if answer.huge is not None:
            if answer.chunked:
                headers["Transfer-Encoding"] = "chunked"
            else:
                headers["Content-Length"] = str(answer.huge + 2)
            writer.write(_head(answer.status, reason, headers))
            piece = b"x" * 65536
            sent = 0
            if answer.chunked:
                writer.write(b"1\r\n\"\r\n")
            else:
                writer.write(b'"')
            while sent < answer.huge:
                chunk = piece[: answer.huge - sent]
                writer.write((b"%x\r\n" % len(chunk) + chunk + b"\r\n") if answer.chunked else chunk)
                sent += len(chunk)
                await writer.drain()
            writer.write(b"1\r\n\"\r\n0\r\n\r\n" if answer.chunked else b'"')
            await writer.drain()
            return
        body = answer.body if isinstance(answer.body, bytes) else json.dumps(answer.body).encode()
        headers.setdefault("Content-Length", str(len(body)))
        writer.write(_head(answer.status, reason, headers))
        if answer.drip:
            for i in range(len(body)):
                writer.write(body[i:i + 1])
                await writer.drain()
                await asyncio.sleep(answer.drip)
        else:
            writer.write(body)
        await writer.drain()


def _head(status: int, reason: str, headers: dict[str, str]) -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode("latin-1")


@contextlib.asynccontextmanager
async def capture_pair(first: str, second: str, handler: Handler | None = None):
    """Two capture servers on the same port of two loopback addresses (what one name rebound between two
    addresses reaches); retried on another port when the second address has that port taken."""
    for _ in range(20):
        one = await CaptureServer(handler, host=first).__aenter__()
        try:
            two = await CaptureServer(handler, host=second, port=one.port).__aenter__()
        except OSError:
            await one.__aexit__(None, None, None)
            continue
        try:
            yield one, two
        finally:
            await two.__aexit__(None, None, None)
            await one.__aexit__(None, None, None)
        return
    raise RuntimeError(f"no port free on both {first} and {second}")


# --- a resolver the test controls -----------------------------------------------------------------------


class ResolverLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop whose name resolution the test scripts for the names it chooses.

    ``answer(name, [addresses of the 1st lookup], [of the 2nd], ...)`` makes each lookup of `name` on this loop
    get the next list (the last one repeats) and counts it in ``lookups``; a DNS server rebinding a name
    between two lookups behaves like this. Every other name goes to the system resolver as usual. Whatever
    resolves on the loop sees it: the node's ``Net``, httpx (through anyio) and asyncio's own connections.
    Use it as the ``anyio_backend`` ``loop_factory``; names under ``.test`` (RFC 2606) never reach DNS.
    """

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, list[list[str]]] = {}
        self.lookups: collections.Counter[str] = collections.Counter()

    def answer(self, name: str, *lookups: list[str]) -> None:
        self.answers[name.lower()] = [list(addresses) for addresses in lookups]
        self.lookups[name.lower()] = 0

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        name = (host.decode("idna") if isinstance(host, bytes) else host or "").lower().rstrip(".")
        script = self.answers.get(name)
        if script is None:
            return await super().getaddrinfo(host, port, family=family, type=type, proto=proto, flags=flags)
        self.lookups[name] += 1
        addresses = script.pop(0) if len(script) > 1 else script[0]
        number = int(port or 0)
        infos = []
        for address in addresses:
            v6 = ":" in address
            af = socket.AF_INET6 if v6 else socket.AF_INET
            if family not in (0, socket.AF_UNSPEC, af):
                continue
            infos.append((af, type or socket.SOCK_STREAM, proto or socket.IPPROTO_TCP, "",
                          (address, number, 0, 0) if v6 else (address, number)))
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return infos


def resolver() -> ResolverLoop:
    """The running loop's scripted resolver (the module's ``anyio_backend`` must use :class:`ResolverLoop`)."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, ResolverLoop), "this test needs anyio_backend with loop_factory=ResolverLoop"
    return loop


# --- counting what a client read --------------------------------------------------------------------------


class ReadCounter:
    """Counts, per ``address:port``, the response body bytes a node's HTTP client took in (what it read, not
    what the server sent or the kernel buffered), through the pool's observer."""

    def __init__(self) -> None:
        self.read: collections.Counter[str] = collections.Counter()

    def __call__(self, address: str, port: int, n: int) -> None:
        self.read[f"{address}:{port}"] += n


async def count_reads(node) -> ReadCounter:
    """Count what `node`'s outbound HTTP client (http_transport's keep-alive pool, every ``http://`` request)
    reads from each peer."""
    from darkmatter_http_transport import transport_of

    counter = ReadCounter()
    transport_of(node).open().lean.observer = counter
    return counter


def well_known_doc(agent_id: str, public_key_hex: str, url: str) -> dict:
    """The §8.3 document a (fake) node at `url` would serve."""
    return {"darkmatter": True, "protocol_version": "0.3", "agent_id": agent_id, "display_name": "fake",
            "public_key_hex": public_key_hex, "bio": "", "status": "active", "accepting_connections": True,
            "mesh_url": url + "/__darkmatter__", "mcp_url": url + "/mcp", "webrtc_enabled": False,
            "is_genesis": True, "plugins": []}


def sign_peer_update(identity, agent_id: str, new_url: str, timestamp: str) -> str:
    from darkmatter.identity import peer_update_string

    return identity.sign(peer_update_string(agent_id, new_url, timestamp))


def can_mount() -> bool:
    """True when this process may mount a tmpfs (root, or CAP_SYS_ADMIN): disk-full and read-only cases."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m"):
    """Mount a small tmpfs at `path` for the duration (root only); always unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True,
                   capture_output=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def read_only(path: Path):
    """Make `path` read-only for new opens (a read-only bind mount over itself) while files already open
    for writing (the node's state lock) stay usable, as when a disk is remounted read-only under a process."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True, timeout=30)
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
