"""The node's HTTP port: one Starlette app on hypercorn, holding the mesh routes plugins register and
the MCP endpoint at ``/mcp``.

Mesh paths follow docs/protocol.md §2.1 (JSON errors, Origin → 403, Host → 421 on loopback binds, bodies over
1 MiB → 413 before parsing); ``/mcp`` follows §12 (see ``mcp.py``).
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import inspect
import json
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Match, Route

from darkmatter.errors import StartupError
from darkmatter.wire import MAX_BODY, ProtocolError, dumps_compact, loads_object

if TYPE_CHECKING:
    from darkmatter.node import Node

log = logging.getLogger(__name__)

MESH_PREFIXES = ("/__darkmatter__", "/.well-known/", "/bootstrap")
READ_TIMEOUT = 30.0  # §13.3: reading request headers and body (DARKMATTER_HTTP_READ_TIMEOUT)


def read_timeout(node: Node) -> float:
    return node.config.get_float("DARKMATTER_HTTP_READ_TIMEOUT", READ_TIMEOUT, minimum=0.1)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on (host, port); port 0 picks a free one. Raises StartupError when taken."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"Port {port} on {host} is already in use (set DARKMATTER_PORT or --port "
                               f"to another port)") from None
        raise StartupError(f"Cannot bind {host}:{port}: {exc.strerror}") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


class JSONAnswer(JSONResponse):
    """A JSON answer as Starlette's JSONResponse writes it (compact, UTF-8; a float may be spelt differently,
    1e-7 for 1e-07), encoded several times faster: it is on the path of every mesh request. See
    ``wire.dumps_compact``."""

    def render(self, content: Any) -> bytes:
        return dumps_compact(content)


def error_response(exc: ProtocolError) -> JSONResponse:
    headers = {}
    if exc.status == 429 and "retry_after" in exc.extra:
        headers["Retry-After"] = str(exc.extra["retry_after"])
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONAnswer(exc.body(), status_code=exc.status, headers=headers)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """Read the request body, refusing (413) anything over `limit` without buffering it, and (408) a body
    that has not fully arrived within the read timeout, however steadily it trickles in (slow loris)."""
    # NOTE: the raw header pairs (names are lowercase in ASGI), not request.headers: building Starlette's
    # Headers view for one header cost more than the scan.
    declared = next((value.decode("latin-1") for name, value in request.scope["headers"]
                     if name == b"content-length"), None)
    if declared is not None:
        if not declared.isdigit():
            raise ProtocolError(400, "invalid_field", "Invalid Content-Length")
        if int(declared) > limit:
            raise ProtocolError(413, "too_large", f"Request body exceeds {limit} bytes")
    app_state = getattr(request.scope.get("app"), "state", None)
    deadline = getattr(app_state, "read_timeout", READ_TIMEOUT)
    if hasattr(request, "_body"):  # already read by someone else
        return request._body  # noqa: SLF001
    chunks: list[bytes] = []
    total = 0
    receive = request.receive
    # NOTE: the ASGI receive loop itself, not request.stream(): the async generator cost as much as the rest of
    # reading a small body, on the path of every mesh request.
    try:
        async with asyncio.timeout(deadline):
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "http.disconnect":
                    raise ClientDisconnect()
                if kind != "http.request":
                    continue
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > limit:
                    raise ProtocolError(413, "too_large", f"Request body exceeds {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise ProtocolError(408, "invalid_field", f"Request body not received within {deadline:g} s") from None
    except ClientDisconnect:  # the client went away mid-body: nothing to answer, nothing to log
        raise ProtocolError(400, "invalid_json", "Request body incomplete: the client disconnected") from None
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - what request.body() returns from now on, as after its own read
    return body


async def read_json(request: Request, limit: int = MAX_BODY) -> dict[str, Any]:
    return loads_object(await read_body(request, limit))


def client_ip(scope: dict) -> str:
    client = scope.get("client")
    return client[0] if client else ""


class MeshGuard:
    """ASGI middleware: the §2.1 rules for mesh paths, then the direct routes.

    ``direct`` maps (method, exact path) to the endpoint of a plain route (an ``async def`` taking a Request, no
    path parameters). Such a request is answered here, with the app's own error handlers, instead of passing
    Starlette's two middlewares, its router and its per-route wrappers: on ``POST /__darkmatter__/message``
    that stack cost about as much CPU as the rest of the node's own work besides the signature check."""

    def __init__(self, app, node: Node, direct: dict, handlers: dict):
        self.app = app
        self.node = node
        self.direct = direct
        self.handlers = handlers  # the app's exception handlers: exception class → handler, Exception last

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(MESH_PREFIXES):
            # NOTE: only two headers matter here; ASGI servers give header names in lowercase
            origin = False
            host = ""
            for name, value in scope["headers"]:
                if name == b"origin" or name.lower() == b"origin":
                    origin = True
                elif name == b"host" or name.lower() == b"host":
                    host = value.decode("latin-1")
            problem = None
            if origin:
                problem = ProtocolError(403, "forbidden", "Browser requests (with an Origin header) are refused")
            elif self.node.bind_is_loopback and not self.node.host_expected(host):
                problem = ProtocolError(421, "misdirected", "Misdirected request: unexpected Host header")
            if problem is not None:
                await error_response(problem)(scope, receive, send)
                return
            endpoint = self.direct.get((scope["method"], scope["path"]))
            if endpoint is not None:
                await self.answer(endpoint, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def answer(self, endpoint, scope, receive, send) -> None:
        scope["app"] = self.app  # what Starlette sets: read_body finds the read timeout through it
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:  # noqa: BLE001 - answered as the app's exception handlers answer it
            handler = next(h for cls, h in self.handlers.items() if isinstance(exc, cls))
            response = await handler(request, exc)
        await response(scope, receive, send)


def direct_routes(routes: list) -> dict:
    """(method, path) → endpoint for every plain route MeshGuard may answer itself (see there)."""
    direct = {}
    for i, route in enumerate(routes):
        if (type(route) is not Route or route.param_convertors or not route.methods
                or not inspect.iscoroutinefunction(route.endpoint)):
            continue
        for method in route.methods - {"HEAD"}:  # Starlette adds HEAD to GET routes; HEAD stays with Starlette
            # the route Starlette's router would pick: the first that matches fully
            probe = {"type": "http", "path": route.path, "root_path": "", "method": method}
            if (method, route.path) not in direct and not any(
                    earlier.matches(probe)[0] is Match.FULL for earlier in routes[:i]):
                direct[(method, route.path)] = route.endpoint
    return direct


def build_app(node: Node) -> Any:
    async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return JSONResponse({"error": "Method not allowed", "code": "method_not_allowed"}, status_code=405)
        if exc.status_code == 404:
            return JSONResponse({"error": "Not found", "code": "not_found"}, status_code=404)
        return JSONResponse({"error": str(exc.detail), "code": "invalid_field"}, status_code=exc.status_code)

    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return error_response(exc)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "Internal error", "code": "unavailable"}, status_code=503)

    routes = list(node.routes)
    if node.mcp is not None:
        routes.append(node.mcp.route())
    handlers = {HTTPException: not_found, ProtocolError: protocol_error, Exception: internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.router.redirect_slashes = False  # §2.1: routes are exact and nothing redirects
    app.state.read_timeout = read_timeout(node)
    return MeshGuard(app, node, direct_routes(routes), handlers)


def _hypercorn_config(node: Node) -> Any:
    from hypercorn.config import Config as HypercornConfig

    config = HypercornConfig()
    assert node.socket is not None
    # hypercorn takes ownership of the descriptor it is given and closes it: hand it a duplicate.
    config.bind = [f"fd://{os.dup(node.socket.fileno())}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # NOTE: hypercorn's idle timer (keep_alive_timeout) runs from connection start until a request's headers
    # are complete, so it also bounds slow headers; read_body bounds the body. hypercorn's own read_timeout
    # stays off: it closes a connection whose client sent nothing for that long, even while the answer is
    # still being worked on -- a long-poll tool call over /mcp (darkmatter_wait_for_message, up to 300 s) or
    # an SSE stream would be cut after DARKMATTER_HTTP_READ_TIMEOUT seconds.
    config.read_timeout = None
    config.keep_alive_timeout = read_timeout(node)
    config.graceful_timeout = 2
    config.h11_max_incomplete_size = 64 * 1024
    config.include_server_header = False
    return config


async def serve(node: Node, shutdown: asyncio.Event, after: asyncio.Event | None = None) -> None:
    """Serve HTTP on ``node.socket`` until ``shutdown`` is set; with ``after``, only once it is set.

    The socket is bound and listening before this runs, so a peer connecting while HTTP waits for ``after``
    (a stdio session answering its MCP client first) waits in the listen backlog rather than being refused.
    hypercorn is imported here (in a thread), not at module import: a stdio session answers before it loads."""
    if after is not None and not after.is_set():
        gate = asyncio.ensure_future(after.wait())
        stopper = asyncio.ensure_future(shutdown.wait())
        try:
            await asyncio.wait({gate, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gate.cancel()
            stopper.cancel()
        if shutdown.is_set():
            return
    # NOTE: off the loop: a stdio session's next tool call is not held up by the import
    hypercorn_serve = (await asyncio.to_thread(importlib.import_module, "hypercorn.asyncio")).serve
    app = build_app(node)
    node.http_ready.clear()

    async def lifespan_app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                    node.http_ready.set()
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await app(scope, receive, send)

    await hypercorn_serve(lifespan_app, _hypercorn_config(node), shutdown_trigger=shutdown.wait)


async def wait_ready(node: Node, timeout: float = 10.0) -> None:
    """Return once the HTTP server is listening; raise what the server task raised if it ended first."""
    if node.http_ready.is_set():
        return
    ready = asyncio.ensure_future(node.http_ready.wait())
    waits = {ready} | ({node.server_task} if node.server_task is not None else set())
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    if node.http_ready.is_set():
        return
    task = node.server_task
    if task is not None and task.done():
        task.result()
        raise StartupError("HTTP server stopped before it was ready")
    raise TimeoutError("HTTP server did not start")


def json_dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
