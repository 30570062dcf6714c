"""The MCP SDK side of the node's control plane (docs/protocol.md §12), loaded on first use.

:class:`darkmatter.mcp.McpServer` (the part every node has) imports this module the first time a session
needs it: the first request to ``/mcp`` in HTTP mode, or the stdio session. The SDK (and the pydantic models
under it) is the largest import of a node, and a node that serves only the mesh never needs it.

Here live the SDK's low-level ``Server`` with the node's tools, the handshake-era sessions, the 2026-era
``subscriptions/listen`` streams, the streamable-HTTP session manager and the stdio session. Tool arguments
are checked against each tool's schema with ``jsonschema``, itself loaded at the first tool call.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
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

from darkmatter import __version__, channel
from darkmatter import scope as session_scope
from darkmatter.tools import Session, Tool, ToolError
from darkmatter.wire import ProtocolError

if TYPE_CHECKING:
    from darkmatter.mcp import McpServer

log = logging.getLogger(__name__)

NOTIFY_TIMEOUT = 2.0  # per session; a client that stops reading never holds up the others


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



class Engine:
    """The SDK server of one node, made by its :class:`~darkmatter.mcp.McpServer` on first use."""

    def __init__(self, front: McpServer):
        from darkmatter.mcp import INSTRUCTIONS

        self.front = front
        self.node = front.node
        self.bus = InMemorySubscriptionBus()
        self.listen = ListenStreams(self.bus)
        self._validators: dict[str, Any] = {}
        self._jsonschema: Any = None
        # Handshake-era connections (stdio and HTTP): key -> (connection, transport kind).
        self._legacy: dict[int, tuple[Any, str]] = {}
        self._scoped: set[int] = set()  # keys of _legacy whose session is scoped to one message (§12.6)
        self.http_inflight = 0
        self._manager: StreamableHTTPSessionManager | None = None
        self._manager_task: asyncio.Task | None = None
        self._manager_stop: asyncio.Event | None = None
        channels = self.node.config.channel != "off"
        self.server = _Server(
            "darkmatter", version=__version__, title="DarkMatter",
            instructions=INSTRUCTIONS + (" " + channel.INSTRUCTIONS if channels else ""),
            cache_hints={"tools/list": CacheHint(ttl_ms=0, scope="private")},
            get_tool_input_schema=self._input_schema,
            on_list_tools=self._list_tools, on_call_tool=self._call_tool,
            on_subscriptions_listen=self.listen,
        )
        self.server.experimental_defaults = {channel.CAPABILITY: {}} if channels else {}
        self.server.middleware.append(self._track)

    # --- tools ------------------------------------------------------------------------------

    def tool_list(self) -> list[types.Tool]:
        out = []
        for tool in self.node.tools.values():
            hints = tool.annotations
            out.append(types.Tool(
                name=tool.name, title=tool.title, description=self.front.describe(tool),
                input_schema=tool.input_schema,
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

    async def _schema_library(self) -> Any:
        if self._jsonschema is None:  # loaded off the event loop, at the first tool call
            self._jsonschema = await asyncio.to_thread(importlib.import_module, "jsonschema")
        return self._jsonschema

    def _argument_problem(self, jsonschema: Any, tool: Tool, arguments: dict) -> str | None:
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
        jsonschema = await self._schema_library()
        try:
            problem = self._argument_problem(jsonschema, tool, arguments)
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
        # NOTE: one encoding serves both forms; the structured copy is made from it (str() for what JSON lacks)
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
        self.front.protocol_versions[ctx.protocol_version] += 1
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self._remember(ctx, "http" if http else "stdio")
        if not http:
            return await call_next(ctx)
        self.http_inflight += 1
        try:
            return await call_next(ctx)
        finally:
            self.http_inflight -= 1

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

    def legacy_kinds(self) -> list[str]:
        return [kind for _, kind in self._legacy.values()]

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

    def can_push(self, get_streams) -> bool:
        return any(key not in self._scoped and (kind == "stdio" or get_streams)
                   for key, (_, kind) in self._legacy.items()) or self.listen.wants_channel()

    async def push_channel(self, params: dict, get_streams) -> int:
        targets = [conn for key, (conn, kind) in list(self._legacy.items()) if conn.initialize_accepted
                   and key not in self._scoped and (kind == "stdio" or get_streams.get(conn.session_id or ""))]

        async def one(conn) -> bool:
            try:
                await asyncio.wait_for(conn.notify(channel.METHOD, params), NOTIFY_TIMEOUT)
                return True
            except Exception as exc:  # noqa: BLE001 - a gone client must not stop the fan-out
                log.debug("channel notification not delivered: %s", exc)
                return False

        reached = sum(await asyncio.gather(*(one(c) for c in targets)))
        return reached + self.listen.push(params)

    # --- streamable HTTP --------------------------------------------------------------------

    async def start_http(self, stopping: asyncio.Event | None) -> None:
        """Run the session manager until :meth:`stop_http` or ``stopping`` (the node's) is set."""
        if self._manager_task is not None:
            return
        self._manager = StreamableHTTPSessionManager(
            app=self.server, max_sessions=256, security_settings=TransportSecuritySettings(
                enable_dns_rebinding_protection=True, allowed_hosts=self.front.allowed_hosts(),
                allowed_origins=self.front.allowed_origins()))
        ready = asyncio.Event()
        stop = self._manager_stop = asyncio.Event()
        # node.stop() sets node.stopping before it shuts the HTTP server down: ending the MCP sessions then
        # closes their open SSE streams, so the server need not wait out its graceful timeout for them.
        stopping = stopping if stopping is not None and not stopping.is_set() else stop
        manager = self._manager

        async def run_manager() -> None:
            # NOTE: the manager's task group lives in its own task, so node start/stop may happen in any
            # order and from any task without crossing anyio cancel scopes.
            async with manager.run():
                ready.set()
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(stopping.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waits:
                        waiter.cancel()
                self.listen.close()

        task = self._manager_task = asyncio.get_running_loop().create_task(run_manager(), name="mcp-http")
        waiter = asyncio.get_running_loop().create_task(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            self._manager_task = None
            task.result()

    async def stop_http(self) -> None:
        task, self._manager_task = self._manager_task, None
        if task is None:
            return
        if self._manager_stop is not None:
            self._manager_stop.set()
        try:
            await asyncio.wait_for(task, 5)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            log.debug("MCP session manager did not stop cleanly", exc_info=True)
        self._manager = None

    @property
    def http_running(self) -> bool:
        return self._manager is not None and self._manager_task is not None and not self._manager_task.done()

    async def handle_request(self, scope, receive, send) -> None:
        assert self._manager is not None
        await self._manager.handle_request(scope, receive, send)

    # --- stdio ------------------------------------------------------------------------------

    async def serve_stdio(self, stdin=None, stdout=None) -> None:
        async with stdio_server(stdin=stdin, stdout=stdout) as (read_stream, write_stream):
            await self.server.run(read_stream, write_stream, self.server.create_initialization_options())


def _explain(err: Any) -> str:
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

