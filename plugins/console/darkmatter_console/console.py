"""The console's HTTP side, under ``/ui`` on the node's port.

* ``GET /ui``: the page (a static shell carrying this session's CSRF token); ``GET /ui/static/<file>``: its
  script, style sheet and icon, shipped inside this package (nothing comes from a CDN).
* ``GET /ui/api/state``: the snapshot (``snapshot.py``); ``GET /ui/api/events``: the same snapshot as
  server-sent events, pushed whenever the node reports a change (``node.listeners``).
* ``POST /ui/api/action/<name>``: connect, accept, reject, disconnect, send, respond, forward, open, impression;
  each calls the kernel's operation (``darkmatter.api``) or the node's own MCP tool.

Who may call: the ``/mcp`` rules (docs/protocol.md §12.2, §12.3): a Host of this node (421 otherwise, against DNS
rebinding), an Origin of this node if any (403), and a loopback caller or the bearer token (401). A browser
elsewhere opens ``/ui?token=<token>`` once; that makes its session cookie carry the authentication.
Every action also needs its session's CSRF token in ``X-DM-CSRF`` and an ``Origin`` equal to the page's own.
Every answer carries a strict Content-Security-Policy: no inline script, nothing from another origin.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from darkmatter.api import (ProtocolError, Session, ToolError, check_control_request, disconnect, forward_message,
                            read_json, request_connection, respond_connection, respond_message, send_message)

from darkmatter_console.snapshot import snapshot

log = logging.getLogger("darkmatter_console")

PREFIX = "/ui"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cross-Origin-Opener-Policy": "same-origin",
           "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-store"}
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".svg": "image/svg+xml", ".html": "text/html; charset=utf-8"}
MAX_SESSIONS = 256
DEBOUNCE = 0.15  # seconds: a burst of changes becomes one event
REFRESH = 3.0  # seconds: look for changes nobody announced (health, discovery)
KEEPALIVE = 15.0  # seconds between comments on an idle event stream
CSRF_HEADER = "x-dm-csrf"


@dataclass
class ConsoleSession:
    csrf: str
    authenticated: bool  # established with the bearer token (a non-loopback browser)


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("darkmatter_console") / "static"
    files = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in TYPES:
            files[item.name] = (item.read_bytes(), TYPES[suffix])
    return files


def _error(status: int, code: str, text: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": text, "code": code}, status_code=status, headers={**HEADERS, **(headers or {})})


class Console:
    """One node's console: its sessions, its event streams and its routes."""

    def __init__(self, node: Any):
        self.node = node
        self.static = _static_files()
        self.sessions: collections.OrderedDict[str, ConsoleSession] = collections.OrderedDict()
        self._streams: set[asyncio.Event] = set()

    # --- routes -------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route(PREFIX, self.page, methods=["GET"]),
            Route(PREFIX + "/static/{name}", self.static_file, methods=["GET"]),
            Route(PREFIX + "/api/state", self.state, methods=["GET"]),
            Route(PREFIX + "/api/events", self.events, methods=["GET"]),
            Route(PREFIX + "/api/action/{name}", self.action, methods=["POST"]),
        ]

    # --- who may call -------------------------------------------------------------------------

    @property
    def cookie_name(self) -> str:
        # NOTE: cookies are shared by every port of a host; the agent id keeps two nodes' sessions apart.
        return "dm_console_" + self.node.agent_id[:16]

    def session_of(self, request: Request) -> ConsoleSession | None:
        sid = request.cookies.get(self.cookie_name)
        return self.sessions.get(sid) if sid else None

    def new_session(self, authenticated: bool) -> tuple[str, ConsoleSession]:
        sid = secrets.token_urlsafe(32)
        session = ConsoleSession(csrf=secrets.token_urlsafe(32), authenticated=authenticated)
        self.sessions[sid] = session
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return sid, session

    def set_cookie(self, response: Response, request: Request, sid: str) -> None:
        response.set_cookie(self.cookie_name, sid, path=PREFIX, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    def admit(self, request: Request) -> Response | None:
        """None when the caller may read; else the refusal (§12.2 Host and Origin, §12.3 authentication)."""
        refusal, _local = check_control_request(self.node, request.scope)
        if refusal is None:
            return None
        if refusal.status_code == 401:
            session = self.session_of(request)
            if session is not None and session.authenticated:
                return None
            return _error(401, "unauthorized", "Unauthorized: the console answers loopback callers; others open "
                          "/ui?token=<the node's bearer token> (kept beside the state file) once.",
                          {"WWW-Authenticate": "Bearer"})
        refusal.headers.update(HEADERS)
        return refusal

    def check_action(self, request: Request) -> Response | None:
        """CSRF defence for a state-changing request: same Origin as the page, this session's token."""
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is None or origin.lower() not in (f"http://{host}".lower(), f"https://{host}".lower()):
            return _error(403, "forbidden", "Forbidden: console actions must come from the console page itself "
                          "(Origin missing or foreign)")
        if request.headers.get("sec-fetch-site") not in (None, "same-origin"):
            return _error(403, "forbidden", "Forbidden: cross-site request refused")
        session = self.session_of(request)
        if session is None:
            return _error(403, "session_expired", "This page's session has ended (the node restarted?): reload "
                          "the page")
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), session.csrf.encode()):
            return _error(403, "forbidden", "Forbidden: missing or wrong CSRF token")
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _error(415, "invalid_field", "Actions take a JSON body (Content-Type: application/json)")
        return None

    # --- the page and its files ---------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        refused = self.admit(request)
        if refused is not None and refused.status_code == 401:
            token = request.query_params.get("token", "")
            node_token = self.node.token or ""
            if node_token and hmac.compare_digest(token.encode(), node_token.encode()):
                # Drop the token from the address bar; the session cookie carries the authentication now.
                sid, _ = self.new_session(authenticated=True)
                response = Response(status_code=303, headers={**HEADERS, "Location": PREFIX})
                self.set_cookie(response, request, sid)
                return response
        if refused is not None:
            return refused
        _refusal, local = check_control_request(self.node, request.scope)
        session = self.session_of(request)
        sid = request.cookies.get(self.cookie_name)
        if session is None:
            sid, session = self.new_session(authenticated=not local)
        html = self.static["index.html"][0].decode().replace("{{csrf}}", session.csrf)
        response = HTMLResponse(html, headers=HEADERS)
        self.set_cookie(response, request, sid)
        return response

    async def static_file(self, request: Request) -> Response:
        refused = self.admit(request)
        if refused is not None:
            return refused
        found = self.static.get(request.path_params["name"])
        if found is None or request.path_params["name"] == "index.html":
            return _error(404, "not_found", "Not found")
        body, media_type = found
        return Response(body, media_type=media_type, headers=HEADERS)

    # --- reading ------------------------------------------------------------------------------

    async def state(self, request: Request) -> Response:
        refused = self.admit(request)
        if refused is not None:
            return refused
        return JSONResponse(snapshot(self.node), headers=HEADERS)

    def _changed(self) -> None:
        for event in self._streams:
            event.set()

    def _subscribe(self) -> asyncio.Event:
        if not self._streams:
            self.node.listeners.append(self._changed)
        event = asyncio.Event()
        self._streams.add(event)
        return event

    def _unsubscribe(self, event: asyncio.Event) -> None:
        self._streams.discard(event)
        if not self._streams and self._changed in self.node.listeners:
            self.node.listeners.remove(self._changed)

    async def events(self, request: Request) -> Response:
        refused = self.admit(request)
        if refused is not None:
            return refused
        return StreamingResponse(self._stream(), media_type="text/event-stream",
                                 headers={**HEADERS, "X-Accel-Buffering": "no"})

    async def _stream(self) -> AsyncIterator[str]:
        changed = self._subscribe()
        stopping = self.node.stopping
        loop = asyncio.get_running_loop()
        last = None
        last_write = loop.time()
        seq = 0
        try:
            yield "retry: 2000\n\n"
            while stopping is None or not stopping.is_set():
                changed.clear()
                data = json.dumps(snapshot(self.node), ensure_ascii=False, default=str)
                if data != last:
                    seq += 1
                    last = data
                    last_write = loop.time()
                    yield f"event: state\nid: {seq}\ndata: {data}\n\n"
                elif loop.time() - last_write >= KEEPALIVE:
                    last_write = loop.time()
                    yield ": keepalive\n\n"
                await _wait_any(changed, stopping, REFRESH)
                if stopping is not None and stopping.is_set():
                    break
                await asyncio.sleep(DEBOUNCE)
        finally:
            self._unsubscribe(changed)

    # --- actions ------------------------------------------------------------------------------

    async def action(self, request: Request) -> Response:
        name = request.path_params["name"]
        refused = self.admit(request) or self.check_action(request)
        if refused is not None:
            if refused.status_code in (403, 421):  # a page elsewhere tried to act: worth a line in the log
                log.warning("console: refused action %r (HTTP %d) from Origin %r", name[:40], refused.status_code,
                            (request.headers.get("origin") or "none")[:100])
            return refused
        handler = ACTIONS.get(name)
        if handler is None:
            return _error(404, "not_found", f"Unknown action {name!r}")
        try:
            body = await read_json(request)
            result = await handler(self.node, body)
        except (ToolError, BadInput) as exc:
            return _error(400, "invalid_field", str(exc) or f"{name} failed")
        except ProtocolError as exc:
            return _error(exc.status, exc.code, exc.error)
        except Exception as exc:  # noqa: BLE001 - the page gets one readable line, the log gets the trace
            log.exception("console action %s failed", name)
            return _error(500, "unavailable", f"{name} failed unexpectedly ({type(exc).__name__}); see the node's log")
        return JSONResponse(result, headers=HEADERS)


async def _wait_any(event: asyncio.Event, stopping: asyncio.Event | None, timeout: float) -> None:
    waits = [asyncio.ensure_future(event.wait())]
    if stopping is not None:
        waits.append(asyncio.ensure_future(stopping.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()


# --- the actions --------------------------------------------------------------------------------


class BadInput(Exception):
    """The action's body is missing a field or has one of the wrong type."""


def text(body: dict, name: str, *, required: bool = True, limit: int = 70_000) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise BadInput(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise BadInput(f"{name} must be a string")
    if len(value) > limit:
        raise BadInput(f"{name} is longer than {limit} characters")
    return value


async def _connect(node, body):
    return await request_connection(node, text(body, "url", limit=2048).strip())


async def _accept(node, body):
    return await respond_connection(node, text(body, "request_id", limit=128), True)


async def _reject(node, body):
    return await respond_connection(node, text(body, "request_id", limit=128), False)


async def _disconnect(node, body):
    return await disconnect(node, text(body, "agent_id", limit=128))


async def _send(node, body):
    content = text(body, "content")
    if not content.strip():
        raise BadInput("content must not be blank")
    return await send_message(node, content, text(body, "to", required=False, limit=128))


async def _respond(node, body):
    response = text(body, "response")
    if not response.strip():
        raise BadInput("response must not be blank")
    return await respond_message(node, text(body, "message_id", limit=128), response)


async def _forward(node, body):
    return await forward_message(node, text(body, "message_id", limit=128), text(body, "to", limit=128),
                                 text(body, "note", required=False, limit=1000))


async def _tool(node, name: str, arguments: dict) -> dict:
    tool = node.tools.get(name)
    if tool is None:
        raise BadInput(f"this node has no {name} tool")
    return await tool.handler(node, arguments, Session(local=True, transport="console"))


async def _open(node, body):
    """The whole message, through the node's own tool (kernels with read state mark it read there)."""
    return await _tool(node, "darkmatter_get_message", {"message_id": text(body, "message_id", limit=128)})


async def _impression(node, body):
    agent_id = text(body, "agent_id", limit=128)
    impression = text(body, "impression", required=False, limit=10_000)
    if impression is None or not impression.strip():
        result = await _tool(node, "darkmatter_delete_impression", {"agent_id": agent_id})
    else:
        result = await _tool(node, "darkmatter_set_impression", {"agent_id": agent_id, "impression": impression})
    node.changed()
    return result


ACTIONS = {"connect": _connect, "accept": _accept, "reject": _reject, "disconnect": _disconnect, "send": _send,
           "respond": _respond, "forward": _forward, "open": _open, "impression": _impression}
