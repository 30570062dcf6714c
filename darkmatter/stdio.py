"""Async line I/O on the process's stdin and stdout for ``darkmatter run`` in stdio mode.

``StdioPipes`` reads and writes without a thread blocked in ``read()`` (so the process can always exit), and
points fd 0 and 1 at ``/dev/null`` and stderr while it serves, so nothing else in the process (or a child it
spawns) can touch the MCP wire. (Its own module so that a stdio session starts without the relay's HTTP
client; :mod:`darkmatter.relay` re-exports it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
from typing import AsyncIterator

log = logging.getLogger(__name__)

LINE_LIMIT = 32 * 1024 * 1024


def _is_stream(fd: int) -> bool:
    """Can the event loop poll ``fd``? Pipes, sockets and terminals yes; files and /dev/null no."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


class StdioPipes:
    """Async lines in from stdin and out to stdout (also usable as the SDK's ``stdio_server`` streams)."""

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1):
        self._fds = (stdin_fd, stdout_fd)
        self._in: int | None = None
        self._out: int | None = None
        self._flags: list[tuple[int, int]] = []
        self._reader: asyncio.StreamReader | None = None
        self._read_transport: asyncio.BaseTransport | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._in_file = None
        self._lock = asyncio.Lock()
        self._diverted: list[tuple[int, int]] = []
        self._waiters: list[tuple[int, asyncio.Event]] = []
        self.written = 0  # messages written to stdout
        self.closed = False

    def when_written(self, count: int) -> asyncio.Event:
        """An event set once ``count`` messages have been written (already set if they have been)."""
        event = asyncio.Event()
        if self.written >= count:
            event.set()
        else:
            self._waiters.append((count, event))
        return event

    async def open(self) -> StdioPipes:
        loop = asyncio.get_running_loop()
        stdin_fd, stdout_fd = self._fds
        self._in = fcntl.fcntl(stdin_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        self._out = fcntl.fcntl(stdout_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        for fd in (self._in, self._out):
            self._flags.append((fd, fcntl.fcntl(fd, fcntl.F_GETFL)))
        if _is_stream(self._in):
            self._reader = asyncio.StreamReader(limit=LINE_LIMIT)
            protocol = asyncio.StreamReaderProtocol(self._reader)
            self._read_transport, _ = await loop.connect_read_pipe(
                lambda: protocol, os.fdopen(self._in, "rb", buffering=0, closefd=False))
        else:  # a regular file: reads never block for long
            self._in_file = os.fdopen(self._in, "rb", closefd=False)
        if _is_stream(self._out):
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, os.fdopen(self._out, "wb", buffering=0, closefd=False))
            self._writer = asyncio.StreamWriter(transport, protocol, None, loop)
        self._divert(stdin_fd, os.open(os.devnull, os.O_RDONLY))
        self._divert(stdout_fd, os.dup(2))
        return self

    def _divert(self, fd: int, replacement: int) -> None:
        saved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.dup2(replacement, fd)
        os.close(replacement)
        self._diverted.append((fd, saved))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.drain(), 2)
            self._writer.transport.abort()
        if self._read_transport is not None:
            self._read_transport.close()
        if self._reader is not None:
            self._reader.feed_eof()
        for fd, saved in self._diverted:
            with contextlib.suppress(OSError):
                os.dup2(saved, fd)
                os.close(saved)
        for fd, flags in self._flags:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        for fd in (self._in, self._out):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def readline(self) -> bytes:
        if self._reader is not None:
            while True:
                try:
                    return await self._reader.readline()
                except ValueError:  # one line over LINE_LIMIT: drop it, keep serving
                    log.warning("dropped an MCP message longer than %d bytes", LINE_LIMIT)
        assert self._in_file is not None
        return await asyncio.to_thread(self._in_file.readline)

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            raw = await self.readline()
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").strip()
            if line:
                yield line

    async def write(self, text: str) -> None:
        data = text.encode("utf-8")
        async with self._lock:
            if self._writer is not None:
                self._writer.write(data)
                await self._writer.drain()
            else:
                await asyncio.to_thread(_write_all, self._out, data)
            self.written += 1
            if self._waiters:
                for count, event in [w for w in self._waiters if w[0] <= self.written]:
                    event.set()
                    self._waiters.remove((count, event))

    async def flush(self) -> None:
        return None


def _write_all(fd: int | None, data: bytes) -> None:
    assert fd is not None
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
