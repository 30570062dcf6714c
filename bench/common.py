"""Shared pieces of the bench: statistics, child processes, /proc readings, a lean HTTP/1.1 client and
signed message bodies.

Everything here talks to loopback only and every wait is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- statistics -----------------------------------------------------------------------------------------


def spread(values: Iterable[float], digits: int = 3) -> dict:
    """Median with min and max (and the samples) of repeated runs."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "n": len(xs), "samples": [round(x, digits) for x in xs]}


def ratios(numerators: Sequence[float], denominators: Sequence[float], digits: int = 3) -> dict:
    """Paired ratios (run i over baseline i of the same repeat), summarised as a spread."""
    return spread([a / b for a, b in zip(numerators, denominators) if a is not None and b], digits)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


# --- processes and /proc ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (VmRSS)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """A node environment (discovery, UPnP, IP lookup off; isolated HOME) plus what the bench needs."""
    from darkmatter.testing import env_for_tests

    env = env_for_tests(home, DARKMATTER_LOG_LEVEL="warning", PYTHONPATH=str(ROOT),
                        PATH=os.environ.get("PATH", "/usr/bin:/bin"))
    env.update(extra)
    return env


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the bench process dies, however it dies (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Child:
    """A child process we started; stopped by its own pid only."""

    def __init__(self, argv: list[str], env: dict[str, str], *, stdin: bool = False, stdout: bool = False,
                 log: Path | None = None):
        self.argv = argv
        self.log_path = log
        err = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stderr=err,
                                     preexec_fn=_die_with_parent)
        if log:
            err.close()
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def tail(self, lines: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class JsonLineChild(Child):
    """A child speaking one JSON object per line on stdin/stdout (our host and load generator)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path | None = None):
        super().__init__(argv, env, stdin=True, stdout=True, log=log)
        self._lock = asyncio.Lock()

    async def call(self, request: dict, timeout: float = 120.0) -> Any:
        async with self._lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            data = (json.dumps(request) + "\n").encode()
            await asyncio.to_thread(self._write, data)
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line:
            raise RuntimeError(f"{self.argv[-1]} exited ({self.proc.poll()}): {self.tail()}")
        reply = json.loads(line)
        if isinstance(reply, dict) and reply.get("error"):
            raise RuntimeError(f"{self.argv[-1]}: {reply['error']}")
        return reply

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()


async def wait_http(port: int, path: str = "/__darkmatter__/status", timeout: float = 30.0,
                    child: Child | None = None) -> float:
    """Poll until GET path answers 200 on 127.0.0.1:port; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.005) + 1):
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.argv} exited with {child.proc.returncode}: {child.tail()}")
        try:
            async with RawHttp("127.0.0.1", port) as http:
                status, _ = await http.request("GET", path)
            if status == 200:
                return time.monotonic()
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    raise TimeoutError(f"port {port} did not answer {path} within {timeout} s")


# --- a lean HTTP/1.1 keep-alive client -------------------------------------------------------------------


class RawHttp:
    """One keep-alive HTTP/1.1 connection. Far cheaper per request than a general client, so the load
    generator's own CPU use (it shares the two cores with the servers) stays small."""

    def __init__(self, host: str, port: int, timeout: float = 30.0):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawHttp:
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2.0)

    def build(self, method: str, path: str, body: bytes | None = None) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAccept: application/json\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + (body or b"")

    async def send_raw(self, data: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(data)
        return await asyncio.wait_for(self._read_response(), self.timeout)

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        return await self.send_raw(self.build(method, path, body))

    async def _read_response(self) -> tuple[int, bytes]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            chunks = []
            for _ in range(100000):
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                chunks.append(await self.reader.readexactly(size + 2))
            return status, b"".join(c[:-2] for c in chunks)
        return status, await self.reader.readexactly(length or 0)


# --- signed /message bodies --------------------------------------------------------------------------------


def new_identity() -> dict:
    from darkmatter.identity import Identity

    ident = Identity.generate()
    return {"private_key_hex": ident.private_key_hex, "agent_id": ident.public_key_hex}


def signed_message(peer: dict, to_id: str, content: str, *, webhook_base: str = "http://127.0.0.1:9",
                   hops: int = 10, message_id: str | None = None) -> dict:
    """A §4.7 body signed with one v2 signature (what a 0.3 peer sends), as a RawPeer would build it."""
    from darkmatter.identity import Identity, v2_message
    from darkmatter.wire import now_iso

    ident = Identity.from_private_hex(peer["private_key_hex"])
    message_id = message_id or "msg-" + secrets.token_hex(8)
    webhook = f"{webhook_base}/__darkmatter__/webhook/{message_id}"
    ts = now_iso()
    body = {"message_id": message_id, "content": content, "webhook": webhook, "hops_remaining": hops,
            "from_agent_id": ident.public_key_hex, "metadata": {}, "timestamp": ts,
            "from_public_key_hex": ident.public_key_hex}
    body["signature_v2_hex"] = ident.sign(v2_message(ident.public_key_hex, to_id, message_id, ts, hops, webhook,
                                                     content, {}))
    return body


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def monotonic() -> float:
    return time.monotonic()
