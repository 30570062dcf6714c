"""The HTTP transport's client: pooled keep-alive connections, no redirects, bounded reads, the §7.3 address
policy.

Every outbound mesh request goes through :meth:`Net.request`. It resolves the host once off the event
loop, checks every address, and connects to a checked address while keeping the original Host header
(and SNI), so a name cannot be re-resolved ("rebound") between the check and the connection.

Plain ``http://`` requests — every request of a loopback or LAN mesh — go over :class:`LeanPool`: HTTP/1.1
framed by h11 on asyncio streams, a fraction of a general client's CPU per request (a hop's outbound
request is on the path of every send, forward and response). ``https://`` requests use httpx (certificate
verification and SNI as it does them), created at the first one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import h11

from darkmatter.api import LARGE, Blocked, ProtocolError, Reply, classify, loads_strict

log = logging.getLogger(__name__)

USER_AGENT = "darkmatter/0.3"
KEEPALIVE_EXPIRY = 20.0  # seconds an idle connection is kept (peers' servers close theirs after 30 s)
MAX_IDLE_PER_HOST = 16
MAX_IDLE = 64
MAX_ACTIVE = 200  # requests in flight at once, over all hosts
MAX_HEAD = 64 * 1024  # response status line and headers


class Net:
    """The node's pooled HTTP client.

    ``is_local`` and ``known_origin`` are callables supplied by the node: whether the node itself is
    local (§7.3), and whether a URL's origin is one of its own or a stored connection's.
    """

    def __init__(self, is_local: Callable[[], bool], known_origin: Callable[[str], bool]):
        self._is_local = is_local
        self._known_origin = known_origin
        self.lean = LeanPool()
        self._tls = None  # httpx.AsyncClient for https://, made at the first one

    async def aclose(self) -> None:
        self.lean.close()
        if self._tls is not None:
            await self._tls.aclose()
            self._tls = None

    def _tls_client(self):
        if self._tls is None:
            import httpx  # NOTE: only https:// peers need it

            self._tls = httpx.AsyncClient(
                follow_redirects=False, trust_env=False,
                timeout=httpx.Timeout(15.0, connect=5.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=64, keepalive_expiry=30),
                headers={"User-Agent": USER_AGENT},
            )
        return self._tls

    async def _resolve(self, host: str, port: int) -> list[str]:
        literal = host.strip("[]")
        try:
            ipaddress.ip_address(literal.split("%", 1)[0])
            return [literal]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=5.0)
        except (OSError, asyncio.TimeoutError, UnicodeError) as exc:
            raise Blocked(f"cannot resolve {host!r} ({type(exc).__name__}); blocked") from None
        return list(dict.fromkeys(info[4][0] for info in infos))

    async def check(self, url: str, strict: bool) -> str:
        """Resolve and check `url`'s host; return the address to connect to, or raise Blocked."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = await self._resolve(host, port)
        if not addresses:
            raise Blocked(f"{host!r} resolved to no address")
        for address in addresses:
            kind = classify(address)
            if kind == "never":
                raise Blocked(f"address {address} of {host!r} is in a never-allowed range")
            if kind == "local" and strict and not (self._is_local() or self._known_origin(url)):
                raise Blocked(f"address {address} of {host!r} is private or loopback and this node is not local")
        return addresses[0]

    async def request(self, method: str, url: str, *, json_body: Any = None, headers: dict | None = None,
                      timeout: float = 15.0, max_bytes: int = LARGE, strict: bool = False,
                      connect_timeout: float = 5.0) -> Reply:
        """Send one request; never raises for network or peer faults (they come back in the Reply)."""
        started = time.monotonic()
        try:
            address = await self.check(url, strict)
        except Blocked as exc:
            return Reply(None, error=f"blocked: {exc}", error_kind="blocked")
        parts = urlsplit(url)
        send_headers = {"Host": parts.netloc, "Accept": "application/json"}
        if headers:
            send_headers.update(headers)
        content = None
        if json_body is not None:
            content = json.dumps(json_body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            send_headers["Content-Type"] = "application/json"
        try:
            async with asyncio.timeout(timeout):
                if parts.scheme == "https":
                    status, response_headers, body = await self._https(
                        method, url, parts, address, send_headers, content, timeout, connect_timeout, max_bytes)
                else:
                    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                    status, response_headers, body = await self.lean.request(
                        method, address, parts.port or 80, target, send_headers, content,
                        min(connect_timeout, timeout), max_bytes)
        except _ConnectFailed as exc:
            return Reply(None, error=str(exc), error_kind="connect")
        except TimeoutError:
            return Reply(None, error="timed out", error_kind="timeout")
        except _TooLarge:
            return Reply(None, error=f"answer larger than {max_bytes} bytes", error_kind="invalid")
        except _Broken as exc:
            return Reply(None, error=str(exc), error_kind="reset")
        elapsed = (time.monotonic() - started) * 1000
        # §2.1: a peer's answer goes through the same strict parser as a request body (no NaN, no lone
        # surrogates, bounded depth); an answer that fails it is a failed call, never an exception here.
        try:
            parsed = loads_strict(body) if body else None
        except ProtocolError:
            parsed = None
        retry_after = None
        if "retry-after" in response_headers:
            try:
                retry_after = float(response_headers["retry-after"])
            except ValueError:
                retry_after = None
        reply = Reply(status, parsed, elapsed_ms=elapsed, retry_after=retry_after)
        if 300 <= status < 400:
            reply.error = f"redirect ({status}) not followed"
        elif parsed is None and 200 <= status < 300:
            reply.error = "answer is not JSON"
        return reply

    async def _https(self, method: str, url: str, parts, address: str, send_headers: dict, content: bytes | None,
                     timeout: float, connect_timeout: float, max_bytes: int) -> tuple[int, dict, bytes]:
        import httpx

        target = url
        extensions: dict[str, Any] = {}
        if parts.hostname and parts.hostname.strip("[]") != address:
            netloc = f"[{address}]" if ":" in address else address
            if parts.port:
                netloc += f":{parts.port}"
            target = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
            extensions["sni_hostname"] = parts.hostname
        client = self._tls_client()
        try:
            request = client.build_request(
                method, target, content=content, headers=send_headers, extensions=extensions,
                timeout=httpx.Timeout(timeout, connect=connect_timeout))
            response = await client.send(request, stream=True)
            try:
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise _TooLarge()
                chunks = []
                total = 0
                async for chunk in response.aiter_raw():
                    total += len(chunk)
                    if total > max_bytes:
                        raise _TooLarge()
                    chunks.append(chunk)
            finally:
                await response.aclose()
        except httpx.ConnectTimeout:
            raise _ConnectFailed("connect timeout") from None
        except httpx.ConnectError as exc:
            raise _ConnectFailed(f"connect error: {_short(exc)}") from None
        except httpx.TimeoutException:
            raise TimeoutError() from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _Broken(f"{type(exc).__name__}: {_short(exc)}") from None
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}, b"".join(chunks)


# --- plain HTTP/1.1 -----------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class _ConnectFailed(Exception):
    """No connection: refused, unreachable, or the connect timed out (a ``connect`` fault, §6.2)."""


class _Broken(Exception):
    """The connection failed after it was made: reset, closed early, or not HTTP."""


class _Stale(Exception):
    """The connection closed or reset before any answer began."""


class _Connection:
    __slots__ = ("reader", "writer", "http", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        """An idle connection can take the next request: not expired, not closed or half-closed by the peer."""
        return (now - self.idle_since < KEEPALIVE_EXPIRY and not self.writer.is_closing()
                and not self.reader.at_eof() and self.reader.exception() is None)

    def close(self) -> None:
        self.writer.close()


class LeanPool:
    """Keep-alive HTTP/1.1 connections per (address, port), framed by h11.

    A connection goes back to the pool only after a complete exchange both sides kept alive; one the peer
    closed or half-closed while idle is dropped before it would be used. The caller bounds the whole request
    in time (``asyncio.timeout``); connecting has its own, shorter bound."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._active = asyncio.Semaphore(MAX_ACTIVE)
        # Called as observer(address, port, n) for every n bytes of a response body the pool took in (tests
        # measure what the read cap lets through with it); None: nothing is called.
        self.observer: Callable[[str, int, int], None] | None = None

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if conn.usable(now):
                return conn
            conn.close()
        self._idle.pop(key, None)
        return None

    def _give_back(self, key: tuple[str, int], conn: _Connection) -> None:
        conns = self._idle.setdefault(key, [])
        if len(conns) >= MAX_IDLE_PER_HOST or sum(len(c) for c in self._idle.values()) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    async def _connect(self, address: str, port: int, connect_timeout: float) -> _Connection:
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(address, port, limit=MAX_HEAD)
        except TimeoutError:
            raise _ConnectFailed("connect timeout") from None
        except OSError as exc:
            raise _ConnectFailed(f"connect error: {_short(exc)}") from None
        return _Connection(reader, writer)

    async def request(self, method: str, address: str, port: int, target: str, headers: dict[str, str],
                      content: bytes | None, connect_timeout: float,
                      max_bytes: int) -> tuple[int, dict[str, str], bytes]:
        key = (address, port)
        async with self._active:
            conn = self._take(key)
            if conn is not None:
                try:
                    return self._settle(key, conn, await self._exchange(conn, method, target, headers, content,
                                                                        max_bytes, key))
                except _Stale:
                    # NOTE: the peer closed this idle connection as it was taken (its FIN not yet seen): nothing
                    # of an answer came back, so the request goes once more, on a new connection.
                    conn.close()
                except BaseException:
                    conn.close()
                    raise
            conn = await self._connect(address, port, connect_timeout)
            try:
                result = await self._exchange(conn, method, target, headers, content, max_bytes, key)
            except _Stale:
                conn.close()
                raise _Broken("the peer closed the connection before answering") from None
            except BaseException:
                conn.close()
                raise
            return self._settle(key, conn, result)

    def _settle(self, key: tuple[str, int], conn: _Connection, result):
        """Pool the connection after a complete exchange both sides keep alive; else close it."""
        http = conn.http
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
            self._give_back(key, conn)
        else:
            conn.close()
        return result

    async def _exchange(self, conn: _Connection, method: str, target: str, headers: dict[str, str],
                        content: bytes | None, max_bytes: int,
                        key: tuple[str, int]) -> tuple[int, dict[str, str], bytes]:
        http = conn.http
        fields = [("User-Agent", USER_AGENT), *headers.items()]
        if content is not None:
            fields.append(("Content-Length", str(len(content))))
        response = None
        received = 0
        try:
            data = http.send(h11.Request(method=method, target=target, headers=fields))
            if content:
                data += http.send(h11.Data(data=content))
            data += http.send(h11.EndOfMessage())
            conn.writer.write(data)
            await conn.writer.drain()
            chunks: list[bytes] = []
            total = 0
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    data = await conn.reader.read(65536)
                    received += len(data)
                    http.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    response = event
                    declared = _header(event.headers, b"content-length")
                    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                        raise _TooLarge()
                elif isinstance(event, h11.Data):
                    total += len(event.data)
                    if self.observer is not None:
                        self.observer(key[0], key[1], len(event.data))
                    if total > max_bytes:
                        raise _TooLarge()
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    if not received:
                        raise _Stale()
                    raise _Broken("the peer closed the connection before answering")
                # h11.InformationalResponse (1xx): keep reading
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            if not received:  # the connection ended before a single byte of an answer
                raise _Stale() from None
            raise _Broken(f"not HTTP/1.1: {_short(exc)}") from None
        except (ConnectionError, OSError) as exc:
            if not received:
                raise _Stale() from None
            raise _Broken(f"{type(exc).__name__}: {_short(exc)}") from None
        assert response is not None
        head = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers}
        return response.status_code, head, b"".join(chunks)


def _header(headers, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:200]
