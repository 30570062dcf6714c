"""The node's MCP control plane (docs/protocol.md §12): every plugin's tools over stdio and ``/mcp``.

Built on the official SDK's low-level ``Server`` (in :mod:`darkmatter.mcp_engine`, loaded at first use: the
first request to ``/mcp`` or the stdio session). The tools are ``node.tools``; results are JSON text plus
``structuredContent``; a :class:`~darkmatter.tools.ToolError`, bad arguments or a refused protocol step come
back as ``isError`` results the model can read, never as JSON-RPC errors.

Live status: ``darkmatter_status``'s description carries the node's current status with ``ACTION:`` lines,
and ``node.changed()`` sends ``notifications/tools/list_changed`` (debounced) to every session — handshake
(2025-era) sessions over stdio and HTTP on their standalone channel, 2026-era clients on their
``subscriptions/listen`` streams.

Channels (§12.5, ``darkmatter/channel.py``): the server declares the experimental capability ``claude/channel``
and pushes each inbox arrival as ``notifications/claude/channel`` the same ways — to handshake sessions on their
standalone channel (stdio, and HTTP sessions with their GET stream open), and to 2026-era listen streams whose
filter asks for it with the key ``"claude/channel": true``.

``/mcp`` (exactly; ``/mcp/`` is 404) serves streamable HTTP with stateful sessions behind the §12.2 Host and
Origin checks and the §12.3 authentication (loopback clients automatically, others with the bearer token).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import importlib
import ipaddress
import json
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, NoMatchFound

from darkmatter import channel
from darkmatter import scope as session_scope
from darkmatter.tools import Tool

if TYPE_CHECKING:
    from darkmatter.mcp_engine import Engine
    from darkmatter.node import Node

log = logging.getLogger(__name__)

PATH = "/mcp"
STATUS_TOOL = "darkmatter_status"
DEBOUNCE = 0.2  # seconds between node.changed() and the list_changed fan-out
QUOTE_MAX = 40  # peer-controlled text in a description: length-capped and quoted (§12.5)
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")

INSTRUCTIONS = (
    "DarkMatter connects you to a mesh of other AI agents: you hold connections to peers, receive messages "
    "in an inbox, and send, forward and answer messages. The darkmatter_status tool's description always "
    "shows your live status; lines starting with ACTION: ask you to do something."
)


# --- live status -------------------------------------------------------------------------------------


def quoted(text: Any, limit: int = QUOTE_MAX) -> str:
    """Peer-controlled text, length-capped and quoted for a description (§12.5)."""
    text = " ".join(str(text or "").split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return json.dumps(text, ensure_ascii=False)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def live_status(node: Node) -> list[str]:
    """The live status: one summary line, then the plugins' lines (``dm_status_lines``, where the kernel's
    built-ins put their ``ACTION:`` lines: pending requests, inbox, no connections, generic bio, inactive,
    failing peers)."""
    state = node.state
    if not state:
        return ["LIVE STATUS: node not started."]
    conns = node.connections
    failing = sum(1 for c in conns.values() if (c.get("health_failures") or 0) > 0)
    name = state.get("display_name") or node.agent_id[:12]
    summary = (f"LIVE STATUS: agent {quoted(name)} is {state.get('status', 'active')}, "
               f"{_plural(len(conns), 'connection')}"
               + (f" ({failing} failing health checks)" if failing else "")
               + f", {_plural(len(state.get('inbox') or []), 'inbox message')}, "
               f"{_plural(len(state.get('pending_requests') or {}), 'pending connection request')}.")
    lines = [summary]
    try:
        lines.extend(node.status_lines())
    except Exception:  # noqa: BLE001 - a plugin's status must not break tools/list
        log.exception("a plugin's dm_status_lines failed")
    return lines


# --- the server --------------------------------------------------------------------------------------


# --- the server --------------------------------------------------------------------------------------


ENGINE = "darkmatter.mcp_engine"


_engine_module: Any = None


async def load_engine_module() -> Any:
    """Import the SDK side off the event loop (it is the largest import of a node). Concurrent callers wait for
    the same import (the import system's module lock); once loaded this returns at once."""
    global _engine_module
    if _engine_module is None:
        # NOTE: not sys.modules: while another thread imports it, the module is there half initialized
        _engine_module = await asyncio.to_thread(importlib.import_module, ENGINE)
    return _engine_module


class McpServer:
    """The node's MCP server. ``route()`` serves ``/mcp``; ``lifespan()`` runs it; ``serve_stdio()`` serves
    one stdio session.

    This part holds what needs no MCP SDK: the ``/mcp`` admission rules, the channel, the live-status
    debounce and the session counts. The SDK side (:mod:`darkmatter.mcp_engine`) is loaded at first use — the
    first request to ``/mcp`` or the stdio session — so a node that only serves the mesh never loads it."""

    def __init__(self, node: Node):
        self.node = node
        self.channel = channel.Channel(node, self.push_channel, self.can_push)
        self._get_streams: collections.Counter[str] = collections.Counter()  # session id -> open GET streams
        self._http_streams = 0  # standalone GET streams open (where handshake sessions get notifications)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._notify_task: asyncio.Task | None = None
        self._engine: Engine | None = None
        self._engine_lock = asyncio.Lock()
        self._serving = False  # inside lifespan(): the HTTP side may run
        self.notifications_sent = 0
        self.protocol_versions: collections.Counter[str] = collections.Counter()  # requests per version

    # --- the SDK side -----------------------------------------------------------------------

    @property
    def engine(self) -> Engine | None:
        """The SDK side, or None while nothing has needed it."""
        return self._engine

    async def ensure_engine(self, http: bool = False) -> Engine:
        """The SDK side, loaded (and with ``http``, its session manager running) on first use."""
        engine = self._engine
        if engine is not None and (not http or engine.http_running):
            return engine
        async with self._engine_lock:
            if self._engine is None:
                module = await load_engine_module()
                self._engine = module.Engine(self)
            if http and self._serving and not self._engine.http_running:
                await self._engine.start_http(self.node.stopping)
        return self._engine

    @property
    def _listen(self):
        """The 2026-era listen streams (None until the SDK side is loaded)."""
        return self._engine.listen if self._engine is not None else None

    # --- tools ------------------------------------------------------------------------------

    def describe(self, tool: Tool) -> str:
        if tool.name != STATUS_TOOL:
            return tool.description
        return tool.description.rstrip() + "\n\n" + "\n".join(live_status(self.node))

    # --- sessions and notifications ---------------------------------------------------------

    def http_sessions(self) -> int:
        """MCP sessions over HTTP that keep a stdio-less node alive (§12.4): handshake sessions plus requests
        in flight (2026-era listen streams included)."""
        engine = self._engine
        if engine is None:
            return 0
        return engine.legacy_kinds().count("http") + engine.http_inflight

    def sessions(self) -> dict[str, int]:
        engine = self._engine
        legacy = engine.legacy_kinds() if engine is not None else []
        return {"stdio": legacy.count("stdio"), "http": legacy.count("http"),
                "http_inflight": engine.http_inflight if engine is not None else 0,
                "http_streams": self._http_streams}

    def changed(self) -> None:
        """``node.changed()`` listener: schedule one list_changed fan-out (debounced)."""
        if self._engine is None:
            return  # no session exists before the SDK side is loaded
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._flush_handle is None:
            self._flush_handle = loop.call_later(DEBOUNCE, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._notify_task is not None and not self._notify_task.done():
            # A fan-out is still running: go again once it finishes.
            self._notify_task.add_done_callback(lambda _t: self.changed())
            return
        self._notify_task = asyncio.get_running_loop().create_task(self.notify_tools_changed(),
                                                                   name="mcp-list-changed")

    async def notify_tools_changed(self) -> None:
        """Send ``notifications/tools/list_changed`` to every session now."""
        if self._engine is not None:
            await self._engine.notify_tools_changed()
        self.notifications_sent += 1

    def can_push(self) -> bool:
        """Whether any session could take a channel notification now (see :meth:`push_channel`)."""
        return self._engine is not None and self._engine.can_push(self._get_streams)

    async def push_channel(self, params: dict) -> int:
        """Send ``notifications/claude/channel`` with ``params`` to every session that can receive it now:
        handshake sessions over stdio, HTTP ones with their GET stream open, and 2026-era listen streams that
        asked for channel events. Returns how many took it."""
        if self._engine is None:
            return 0
        return await self._engine.push_channel(params, self._get_streams)

    # --- HTTP: security (§12.2, §12.3) ------------------------------------------------------

    def allowed_hosts(self) -> list[str]:
        port = self.node.port
        hosts = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]
        public = self.node.config.public_url
        if public:
            parts = urlsplit(public)
            name = parts.hostname or ""
            name = f"[{name}]" if ":" in name else name
            default = 443 if parts.scheme == "https" else 80
            hosts.append(f"{name}:{parts.port or default}")
            if (parts.port or default) == default:
                hosts.append(name)
        host = self.node.config.host.strip("[]")
        if not self.node.bind_is_wildcard and host not in ("127.0.0.1", "localhost", "::1"):
            # a specific bind, e.g. 127.0.0.2 or a LAN address
            hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        if port in (80, 443):
            hosts += [h.rsplit(":", 1)[0] for h in hosts[:3]]
        return list(dict.fromkeys(h.lower() for h in hosts))

    def allowed_origins(self) -> list[str]:
        return [f"{scheme}://{host}" for host in self.allowed_hosts() for scheme in ("http", "https")]

    def check_request(self, scope) -> tuple[JSONResponse | None, bool]:
        """The §12.2/§12.3 verdict for one request: (refusal or None, is the client local)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        if headers.get("host", "").lower() not in self.allowed_hosts():
            return _refusal(421, "misdirected", "Misdirected request: unexpected Host header"), False
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.allowed_origins():
            return _refusal(403, "forbidden", "Forbidden: cross-origin request refused"), False
        client = scope.get("client")
        local = bool(client) and _is_loopback(client[0]) and not any(h in headers for h in PROXY_HEADERS)
        if local:
            return None, True
        token = self.node.token or ""
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if token and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return None, False
        return _refusal(401, "unauthorized", "Unauthorized: a bearer token is required for non-loopback "
                        "clients (it is kept beside the state file)", {"WWW-Authenticate": "Bearer"}), False

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await JSONResponse({"error": "Not found", "code": "not_found"}, status_code=404)(scope, receive, send)
            return
        refusal, local = self.check_request(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        token = next((v.decode("latin-1") for k, v in scope.get("headers") or []
                      if k.lower() == session_scope.HEADER.encode()), None)
        scoped_to = None
        if token is not None:  # §12.6: a spawned agent's session; a stale token is never a full session
            scoped_to = session_scope.lookup(self.node, token.strip())
            if scoped_to is None:
                await _refusal(401, "unauthorized", "Unknown or expired session token (the agent it was made "
                                                    "for has ended)")(scope, receive, send)
                return
        scope.setdefault("state", {})["darkmatter_local"] = local
        scope["state"]["darkmatter_scope"] = scoped_to
        if not self._serving:
            await _refusal(503, "unavailable", "The MCP endpoint is not running")(scope, receive, send)
            return
        engine = await self.ensure_engine(http=True)
        if not engine.http_running:  # the node stopped meanwhile
            await _refusal(503, "unavailable", "The MCP endpoint is not running")(scope, receive, send)
            return
        if scope["method"] != "GET":
            await engine.handle_request(scope, receive, send)
            return
        session_id = next((v.decode("latin-1") for k, v in scope.get("headers") or []
                           if k.lower() == b"mcp-session-id"), "")
        self._http_streams += 1
        self._get_streams[session_id] += 1
        try:
            await engine.handle_request(scope, receive, send)
        finally:
            self._http_streams -= 1
            self._get_streams[session_id] -= 1
            if self._get_streams[session_id] <= 0:
                del self._get_streams[session_id]

    def route(self) -> BaseRoute:
        return McpRoute(self.asgi)

    # --- lifecycle --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[McpServer]:
        """Serve ``/mcp`` (the SDK side starts with the first request) and listen for live-status changes for the
        node's lifetime."""
        self._serving = True
        self.node.listeners.append(self.changed)
        try:
            yield self
        finally:
            self._serving = False
            with contextlib.suppress(ValueError):
                self.node.listeners.remove(self.changed)
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            if self._notify_task is not None:
                self._notify_task.cancel()
            if self._engine is not None:
                await self._engine.stop_http()

    async def serve_stdio(self, stdin=None, stdout=None) -> None:
        """Serve one MCP session over stdio until the client closes stdin.

        ``stdin``/``stdout`` are async line sources/sinks (see ``darkmatter.stdio.StdioPipes``); by default the
        SDK's own (fd 0 and 1)."""
        engine = await self.ensure_engine()
        await engine.serve_stdio(stdin, stdout)


class McpRoute(BaseRoute):
    """Exactly ``/mcp``. It also claims ``/mcp/`` and answers it 404, so no router setting can ever turn
    that path into a redirect to ``/mcp`` (§2.1)."""

    path = PATH
    methods = None
    name = "mcp"

    def __init__(self, app):
        self.app = app

    def matches(self, scope):
        if scope["type"] == "http" and scope["path"] in (PATH, PATH + "/"):
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any):
        if name == self.name and not path_params:
            from starlette.datastructures import URLPath

            return URLPath(PATH)
        raise NoMatchFound(name, path_params)

    async def handle(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


def _refusal(status: int, code: str, error: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "code": code}, status_code=status, headers=headers)


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


