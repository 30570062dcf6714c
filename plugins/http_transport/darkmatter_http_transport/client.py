"""The HTTP transport's client: one pooled client, no redirects, bounded reads, the §7.3 address policy.

Every outbound mesh request goes through :meth:`Net.request`. It resolves the host once off the event
loop, checks every address, and connects to a checked address while keeping the original Host header
and SNI, so a name cannot be re-resolved ("rebound") between the check and the connection.
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

import httpx

from darkmatter.api import LARGE, Blocked, ProtocolError, Reply, classify, loads_strict

log = logging.getLogger(__name__)


class Net:
    """The node's one pooled HTTP client.

    ``is_local`` and ``known_origin`` are callables supplied by the node: whether the node itself is
    local (§7.3), and whether a URL's origin is one of its own or a stored connection's.
    """

    def __init__(self, is_local: Callable[[], bool], known_origin: Callable[[str], bool]):
        self._is_local = is_local
        self._known_origin = known_origin
        self.client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(15.0, connect=5.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=64, keepalive_expiry=30),
            headers={"User-Agent": "darkmatter/0.3"},
        )

    async def aclose(self) -> None:
        await self.client.aclose()

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
        host_header = parts.netloc
        target = url
        extensions: dict[str, Any] = {}
        if parts.hostname and parts.hostname.strip("[]") != address:
            netloc = f"[{address}]" if ":" in address else address
            if parts.port:
                netloc += f":{parts.port}"
            target = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
            if parts.scheme == "https":
                extensions["sni_hostname"] = parts.hostname
        send_headers = {"Host": host_header, "Accept": "application/json"}
        if headers:
            send_headers.update(headers)
        content = None
        if json_body is not None:
            content = json.dumps(json_body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            send_headers["Content-Type"] = "application/json"
        try:
            async with asyncio.timeout(timeout):
                request = self.client.build_request(
                    method, target, content=content, headers=send_headers, extensions=extensions,
                    timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)))
                response = await self.client.send(request, stream=True)
                try:
                    body = await _read_capped(response, max_bytes)
                finally:
                    await response.aclose()
        except httpx.ConnectTimeout:
            return Reply(None, error="connect timeout", error_kind="connect")
        except httpx.ConnectError as exc:
            return Reply(None, error=f"connect error: {_short(exc)}", error_kind="connect")
        except (TimeoutError, httpx.TimeoutException):
            return Reply(None, error="timed out", error_kind="timeout")
        except _TooLarge:
            return Reply(None, error=f"answer larger than {max_bytes} bytes", error_kind="invalid")
        except (httpx.TransportError, httpx.StreamError) as exc:
            return Reply(None, error=f"{type(exc).__name__}: {_short(exc)}", error_kind="reset")
        elapsed = (time.monotonic() - started) * 1000
        # §2.1: a peer's answer goes through the same strict parser as a request body (no NaN, no lone
        # surrogates, bounded depth); an answer that fails it is a failed call, never an exception here.
        try:
            parsed = loads_strict(body) if body else None
        except ProtocolError:
            parsed = None
        retry_after = None
        if "retry-after" in response.headers:
            try:
                retry_after = float(response.headers["retry-after"])
            except ValueError:
                retry_after = None
        reply = Reply(response.status_code, parsed, elapsed_ms=elapsed, retry_after=retry_after)
        if 300 <= response.status_code < 400:
            reply.error = f"redirect ({response.status_code}) not followed"
        elif parsed is None and 200 <= response.status_code < 300:
            reply.error = "answer is not JSON"
        return reply


class _TooLarge(Exception):
    pass


async def _read_capped(response: httpx.Response, cap: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise _TooLarge()
    chunks = []
    total = 0
    async for chunk in response.aiter_raw():
        total += len(chunk)
        if total > cap:
            raise _TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:200]
