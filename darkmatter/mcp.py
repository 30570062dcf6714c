"""The node's MCP control plane (docs/protocol.md §12): every plugin's tools over stdio and ``/mcp``.

Built on the official SDK's low-level ``Server``. The tools are ``node.tools``; results are JSON text plus
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
import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal
from urllib.parse import urlsplit

import anyio
import jsonschema
import mcp_types as types
from mcp.server.caching import CacheHint
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.stdio import stdio_server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.subscriptions import InMemorySubscriptionBus, ToolsListChanged
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import SUBSCRIPTION_ID_META_KEY, event_matches, event_to_notification
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, NoMatchFound

from darkmatter import __version__, channel
from darkmatter import scope as session_scope
from darkmatter.tools import Session, Tool, ToolError
from darkmatter.wire import ProtocolError

if TYPE_CHECKING:
    from darkmatter.node import Node

log = logging.getLogger(__name__)

PATH = "/mcp"
STATUS_TOOL = "darkmatter_status"
DEBOUNCE = 0.2  # seconds between node.changed() and the list_changed fan-out
NOTIFY_TIMEOUT = 2.0  # per session; a client that stops reading never holds up the others
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


class _Server(Server):
    """The low-level server, advertising ``tools.listChanged`` on every handshake (stdio and HTTP alike) and
    ``experimental_defaults`` (``claude/channel``) in every era's capabilities (handshake and ``server/discover``)."""

    experimental_defaults: dict[str, dict[str, Any]] = {}

    def create_initialization_options(self, notification_options=None, experimental_capabilities=None,
                                      extensions=None):
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True), experimental_capabilities, extensions)

    def get_capabilities(self, notification_options=None, experimental_capabilities=None, extensions=None, *,
                         protocol_version=None):
        if experimental_capabilities is None and self.experimental_defaults:
            experimental_capabilities = dict(self.experimental_defaults)
        return super().get_capabilities(notification_options, experimental_capabilities, extensions,
                                        protocol_version=protocol_version)


class _ChannelParams(types.NotificationParams):
    content: str
    channel_meta: dict[str, str] = Field(alias="meta")


class _ChannelNotification(types.Notification[_ChannelParams, Literal["notifications/claude/channel"]]):
    method: Literal["notifications/claude/channel"] = channel.METHOD
    params: _ChannelParams


@dataclass(frozen=True)
class _Push:
    params: dict


class ListenStreams:
    """Serves ``subscriptions/listen`` (2026 era): one call is one stream. It carries the change events the
    filter asked for (published on ``bus``, as the SDK's ``ListenHandler`` does) and, when the filter carries
    ``"claude/channel": true`` (echoed in the acknowledgement), channel notifications. A stream whose client
    stops reading is ended once ``max_buffered`` items wait (the client re-listens)."""

    def __init__(self, bus: InMemorySubscriptionBus, *, max_streams: int = 1024, max_buffered: int = 1024):
        self._bus = bus
        self._max_streams = max_streams
        self._max_buffered = max_buffered
        self._streams: dict[Any, bool] = {}  # send side of each open stream -> does it want channel pushes

    async def __call__(self, ctx, params: types.SubscriptionsListenRequestParams) -> types.SubscriptionsListenResult:
        subscription_id = ctx.request_id
        if subscription_id is None:
            raise MCPError(types.INVALID_REQUEST, "subscriptions/listen requires a request id")
        if len(self._streams) >= self._max_streams:
            raise MCPError(types.INTERNAL_ERROR, "Subscription limit reached")
        wanted = params.notifications
        # a spawned agent's session (§12.6) never gets other messages pushed to it
        wants_channel = (wanted.model_extra or {}).get(channel.LISTEN_KEY) is True and _scope_of(ctx) is None
        honored = types.SubscriptionFilter(
            tools_list_changed=wanted.tools_list_changed or None,
            prompts_list_changed=wanted.prompts_list_changed or None,
            resources_list_changed=wanted.resources_list_changed or None,
            resource_subscriptions=list(wanted.resource_subscriptions or ()) or None,
            **({channel.LISTEN_KEY: True} if wants_channel else {}))
        uris = frozenset(honored.resource_subscriptions or ())
        meta = {SUBSCRIPTION_ID_META_KEY: subscription_id}
        send, recv = anyio.create_memory_object_stream(self._max_buffered)

        def deliver(event) -> None:
            if event_matches(honored, uris, event):
                self._offer(send, event)

        # Subscribed before the acknowledgement is written, so nothing published meanwhile is lost; it is
        # still the first frame, since only this task writes the stream.
        unsubscribe = self._bus.subscribe(deliver)
        self._streams[send] = wants_channel
        try:
            await ctx.session.send_notification(types.SubscriptionsAcknowledgedNotification(
                params=types.SubscriptionsAcknowledgedNotificationParams(notifications=honored, _meta=meta)),
                related_request_id=subscription_id)
            async for item in recv:
                if isinstance(item, _Push):
                    note = _ChannelNotification(params=_ChannelParams(
                        content=item.params["content"], meta=item.params["meta"], _meta=meta))
                else:
                    note = event_to_notification(item, meta)
                await ctx.session.send_notification(note, related_request_id=subscription_id)
        finally:
            unsubscribe()
            self._streams.pop(send, None)
            send.close()
            recv.close()
        return types.SubscriptionsListenResult(_meta=meta)

    def _offer(self, send, item) -> bool:
        try:
            send.send_nowait(item)
            return True
        except anyio.ClosedResourceError:
            return False
        except anyio.WouldBlock:
            log.warning("a listen stream's client stopped reading; ending that stream")
            self._streams.pop(send, None)
            send.close()
            return False

    def wants_channel(self) -> bool:
        return any(self._streams.values())

    def push(self, params: dict) -> int:
        """Queue a channel notification on every stream that asked for them; return how many took it."""
        return sum(self._offer(send, _Push(params)) for send, wants in list(self._streams.items()) if wants)

    def close(self) -> None:
        """End every stream gracefully (each sends its result after what it has buffered)."""
        for send in list(self._streams):
            send.close()


class McpServer:
    """The node's MCP server. ``route()`` serves ``/mcp``; ``lifespan()`` runs it; ``serve_stdio()`` serves
    one stdio session."""

    def __init__(self, node: Node):
        self.node = node
        self.bus = InMemorySubscriptionBus()
        self._listen = ListenStreams(self.bus)
        self.channel = channel.Channel(node, self.push_channel, self.can_push)
        self._get_streams: collections.Counter[str] = collections.Counter()  # session id -> open GET streams
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        # Handshake-era connections (stdio and HTTP): key -> (connection, transport kind).
        self._legacy: dict[int, tuple[Any, str]] = {}
        self._scoped: set[int] = set()  # keys of _legacy whose session is scoped to one message (§12.6)
        self._http_inflight = 0
        self._http_streams = 0  # standalone GET streams open (where handshake sessions get notifications)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._notify_task: asyncio.Task | None = None
        self._manager: StreamableHTTPSessionManager | None = None
        self.notifications_sent = 0
        self.protocol_versions: collections.Counter[str] = collections.Counter()  # requests per version
        channels = node.config.channel != "off"
        self.server = _Server(
            "darkmatter", version=__version__, title="DarkMatter",
            instructions=INSTRUCTIONS + (" " + channel.INSTRUCTIONS if channels else ""),
            cache_hints={"tools/list": CacheHint(ttl_ms=0, scope="private")},
            get_tool_input_schema=self._input_schema,
            on_list_tools=self._list_tools, on_call_tool=self._call_tool,
            on_subscriptions_listen=self._listen,
        )
        self.server.experimental_defaults = {channel.CAPABILITY: {}} if channels else {}
        self.server.middleware.append(self._track)

    # --- tools ------------------------------------------------------------------------------

    def describe(self, tool: Tool) -> str:
        if tool.name != STATUS_TOOL:
            return tool.description
        return tool.description.rstrip() + "\n\n" + "\n".join(live_status(self.node))

    def tool_list(self) -> list[types.Tool]:
        out = []
        for tool in self.node.tools.values():
            hints = tool.annotations
            out.append(types.Tool(
                name=tool.name, title=tool.title, description=self.describe(tool), input_schema=tool.input_schema,
                annotations=types.ToolAnnotations(
                    title=hints["title"], read_only_hint=hints["readOnlyHint"],
                    destructive_hint=hints["destructiveHint"], idempotent_hint=hints["idempotentHint"],
                    open_world_hint=hints["openWorldHint"])))
        return out

    def _input_schema(self, name: str) -> dict | None:
        tool = self.node.tools.get(name)
        return tool.input_schema if tool is not None else None

    async def _list_tools(self, ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.tool_list())

    def _argument_problem(self, tool: Tool, arguments: dict) -> str | None:
        validator = self._validators.get(tool.name)
        if validator is None:
            cls = jsonschema.validators.validator_for(tool.input_schema, default=jsonschema.Draft202012Validator)
            cls.check_schema(tool.input_schema)
            validator = self._validators[tool.name] = cls(tool.input_schema)
        errors = sorted(validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path])
        if not errors:
            return None
        return f"Invalid arguments for {tool.name}: " + "; ".join(_explain(err) for err in errors[:3])

    async def _call_tool(self, ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        tool = self.node.tools.get(params.name)
        if tool is None:
            return _error_result(f"Unknown tool {params.name!r}. Available tools: {', '.join(self.node.tools)}.")
        try:
            arguments = tool.prepare(dict(params.arguments or {}))  # 0.2 spellings: envelope, nulls, aliases
        except ToolError as exc:
            return _error_result(str(exc))
        try:
            problem = self._argument_problem(tool, arguments)
        except jsonschema.SchemaError:
            log.exception("tool %s (plugin %s) has an invalid input schema", tool.name, tool.plugin)
            return _error_result(f"{tool.name} cannot be called: its input schema is invalid (plugin {tool.plugin}).")
        if problem:
            return _error_result(problem)
        session = self.session_for(ctx)
        if session.scope is not None:
            refused = session_scope.refusal(tool, arguments, session.scope)
            if refused:
                return _error_result(refused)
        try:
            result = await tool.handler(self.node, arguments, session)
        except ToolError as exc:
            return _error_result(str(exc) or f"{tool.name} failed")
        except ProtocolError as exc:
            return _error_result(exc.error)
        except Exception as exc:  # noqa: BLE001 - the model gets a readable error, the log gets the trace
            log.exception("tool %s failed", tool.name)
            return _error_result(f"{tool.name} failed unexpectedly ({type(exc).__name__}); see the node's log.")
        if not isinstance(result, dict):
            result = {"result": result}
        text = json.dumps(result, ensure_ascii=False, indent=2, default=str)
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)],
                                    structured_content=json.loads(text))

    def session_for(self, ctx) -> Session:
        request = getattr(ctx, "request", None)
        if request is None:
            return Session(local=True, transport="stdio")
        state = request.scope.get("state") or {}
        return Session(local=bool(state.get("darkmatter_local")), transport="http",
                       scope=state.get("darkmatter_scope"))

    # --- sessions and notifications ---------------------------------------------------------

    async def _track(self, ctx, call_next):
        """Middleware: remember handshake-era connections; count HTTP requests in flight."""
        http = getattr(ctx, "request", None) is not None
        self.protocol_versions[ctx.protocol_version] += 1
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self._remember(ctx, "http" if http else "stdio")
        if not http:
            return await call_next(ctx)
        self._http_inflight += 1
        try:
            return await call_next(ctx)
        finally:
            self._http_inflight -= 1

    def _remember(self, ctx, kind: str) -> None:
        # NOTE: the SDK exposes the connection only through the session; it owns the standalone channel
        # (stdio pipe or the HTTP GET stream) and an exit stack that runs when the session ends.
        connection = getattr(ctx.session, "_connection", None)
        if connection is None or id(connection) in self._legacy:
            return
        key = id(connection)
        self._legacy[key] = (connection, kind)
        connection.exit_stack.callback(self._legacy.pop, key, None)
        if _scope_of(ctx) is not None:  # a spawned agent's session (§12.6): no channel pushes of other messages
            self._scoped.add(key)
            connection.exit_stack.callback(self._scoped.discard, key)

    def http_sessions(self) -> int:
        """MCP sessions over HTTP that keep a stdio-less node alive (§12.4): handshake sessions plus requests
        in flight (2026-era listen streams included)."""
        return sum(1 for _, kind in self._legacy.values() if kind == "http") + self._http_inflight

    def sessions(self) -> dict[str, int]:
        legacy = [kind for _, kind in self._legacy.values()]
        return {"stdio": legacy.count("stdio"), "http": legacy.count("http"), "http_inflight": self._http_inflight,
                "http_streams": self._http_streams}

    def changed(self) -> None:
        """``node.changed()`` listener: schedule one list_changed fan-out (debounced)."""
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
        targets = [conn for conn, _ in list(self._legacy.values()) if conn.initialize_accepted]

        async def one(conn) -> None:
            try:
                await asyncio.wait_for(conn.send_tool_list_changed(), NOTIFY_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - advisory; a gone client must not stop the fan-out
                log.debug("list_changed not delivered: %s", exc)

        try:  # 2026-era listen streams: buffered per stream, never blocks on a slow client
            await self.bus.publish(ToolsListChanged())
        except Exception:  # noqa: BLE001
            log.exception("publishing list_changed to listen streams failed")
        await asyncio.gather(*(one(c) for c in targets))
        self.notifications_sent += 1

    def can_push(self) -> bool:
        """Whether any session could take a channel notification now (see :meth:`push_channel`)."""
        return any(kind == "stdio" or self._get_streams for _, kind in self._legacy.values()) or \
            self._listen.wants_channel()

    async def push_channel(self, params: dict) -> int:
        """Send ``notifications/claude/channel`` with ``params`` to every session that can receive it now:
        handshake sessions over stdio, HTTP ones with their GET stream open, and 2026-era listen streams that
        asked for channel events. Returns how many took it."""
        targets = [conn for key, (conn, kind) in list(self._legacy.items()) if conn.initialize_accepted
                   and key not in self._scoped and (kind == "stdio" or self._get_streams.get(conn.session_id or ""))]

        async def one(conn) -> bool:
            try:
                await asyncio.wait_for(conn.notify(channel.METHOD, params), NOTIFY_TIMEOUT)
                return True
            except Exception as exc:  # noqa: BLE001 - a gone client must not stop the fan-out
                log.debug("channel notification not delivered: %s", exc)
                return False

        reached = sum(await asyncio.gather(*(one(c) for c in targets)))
        return reached + self._listen.push(params)

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
        if self._manager is None:
            await _refusal(503, "unavailable", "The MCP endpoint is not running")(scope, receive, send)
            return
        if scope["method"] != "GET":
            await self._manager.handle_request(scope, receive, send)
            return
        session_id = next((v.decode("latin-1") for k, v in scope.get("headers") or []
                           if k.lower() == b"mcp-session-id"), "")
        self._http_streams += 1
        self._get_streams[session_id] += 1
        try:
            await self._manager.handle_request(scope, receive, send)
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
        """Run the HTTP session manager and the live-status listener for the node's lifetime."""
        hosts = self.allowed_hosts()
        self._manager = StreamableHTTPSessionManager(
            app=self.server, max_sessions=256, security_settings=TransportSecuritySettings(
                enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=self.allowed_origins()))
        ready = asyncio.Event()
        stop = asyncio.Event()
        # node.stop() sets node.stopping before it shuts the HTTP server down: ending the MCP sessions then
        # closes their open SSE streams, so the server need not wait out its graceful timeout for them.
        stopping = self.node.stopping if self.node.stopping is not None and not self.node.stopping.is_set() \
            else stop

        async def run_manager() -> None:
            # NOTE: the manager's task group lives in its own task, so node start/stop may happen in any
            # order and from any task without crossing anyio cancel scopes.
            async with self._manager.run():
                ready.set()
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(stopping.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waits:
                        waiter.cancel()
                self._listen.close()

        task = asyncio.get_running_loop().create_task(run_manager(), name="mcp-http")
        waiter = asyncio.get_running_loop().create_task(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            task.result()
        self.node.listeners.append(self.changed)
        try:
            yield self
        finally:
            with contextlib.suppress(ValueError):
                self.node.listeners.remove(self.changed)
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            if self._notify_task is not None:
                self._notify_task.cancel()
            stop.set()
            try:
                await asyncio.wait_for(task, 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                log.debug("MCP session manager did not stop cleanly", exc_info=True)
            self._manager = None

    async def serve_stdio(self, stdin=None, stdout=None) -> None:
        """Serve one MCP session over stdio until the client closes stdin.

        ``stdin``/``stdout`` are async line sources/sinks (see ``darkmatter.relay.StdioPipes``); by default the
        SDK's own (fd 0 and 1)."""
        async with stdio_server(stdin=stdin, stdout=stdout) as (read_stream, write_stream):
            await self.server.run(read_stream, write_stream, self.server.create_initialization_options())


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


def _explain(err: jsonschema.ValidationError) -> str:
    """One readable line per schema violation, without echoing (possibly huge) argument values."""
    where = ".".join(str(p) for p in err.absolute_path) or "arguments"
    value = err.validator_value
    simple = {
        "maxLength": f"{where} is longer than {value} characters",
        "minLength": f"{where} must have at least {value} character(s)",
        "type": f"{where} must be of type {value}",
        "enum": f"{where} must be one of {', '.join(map(str, value))}" if isinstance(value, list) else None,
        "minimum": f"{where} must be at least {value}",
        "maximum": f"{where} must be at most {value}",
        "required": err.message,
        "additionalProperties": err.message,
    }.get(str(err.validator))
    if simple:
        return simple
    return f"{where}: {err.message[:200]}"


def _scope_of(ctx) -> str | None:
    """The message an HTTP request's session is scoped to (set by ``McpServer.asgi``), or None."""
    request = getattr(ctx, "request", None)
    state = (request.scope.get("state") or {}) if request is not None else {}
    return state.get("darkmatter_scope")


def _error_result(message: str) -> types.CallToolResult:
    # NOTE: the structured part keeps the original implementation's failure shape ({"success": false,
    # "error"}) for scripts written against it; the text stays one readable line for the model.
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True,
                                structured_content={"success": False, "error": message})


def _refusal(status: int, code: str, error: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "code": code}, status_code=status, headers=headers)


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback

