"""Inbound A2A: the SDK's request handler and routes in front of the node's inbox.

An A2A ``SendMessage`` becomes an inbox message from the pseudo-peer ``a2a:<caller address>`` (unverified,
``outside_mesh``, under the inbox caps and message rate limits of the mesh) and a task: ``SUBMITTED``, then
``WORKING`` once the agent has seen the message (``darkmatter_list_inbox`` / ``darkmatter_get_message``),
then ``COMPLETED`` with the agent's ``darkmatter_respond_message`` answer as an artifact, or ``CANCELED``
when the caller cancels it or the agent expires the message. A message the node refuses (inactive, inbox
full, rate limited) becomes a ``REJECTED`` task that says why.

While this process holds a task, its executor (``Bridge.run``) is parked in the SDK's active task and every
change goes through it, so the SDK persists it and streams it to subscribers. After a restart a task has no
executor; a change is then a versioned write to the store plus an event on the stream (see ``store.py``).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from a2a.helpers import get_data_parts
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.cluster import ConcurrentTaskModificationError, VersionedEvent
from a2a.server.request_handlers import DefaultRequestHandler, validate_request_params
from a2a.server.routes import DefaultServerCallContextBuilder, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import TaskManager
from a2a.types import (AgentCard, Artifact, Message, Part, Role, SendMessageRequest, Task,
                       TaskArtifactUpdateEvent, TaskState, TaskStatus, TaskStatusUpdateEvent)
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidParamsError, UnsupportedOperationError
from a2a.utils.task import apply_history_length
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, Router

from darkmatter.api import MAX_BODY, ProtocolError, client_ip, external_message, is_loopback_host, read_body

from darkmatter_a2a_bridge import card as cards
from darkmatter_a2a_bridge.paths import TRANSPORT  # noqa: F401 - the inbox transport of A2A messages (re-exported)
from darkmatter_a2a_bridge.settings import Settings
from darkmatter_a2a_bridge.store import (CALLER_KEY, INTERNAL, OPEN, TERMINAL, Caller, LocalEventStream,
                                         NodeTaskStore, caller_of, state_name)

log = logging.getLogger("darkmatter_a2a_bridge")

MAX_CONTENT_BYTES = 65536
CHANGE_WAIT = 15.0  # how long an agent-side change waits for the task's executor to record it
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def message_text(message: Message) -> str:
    """The text an agent reads: text parts as they are, data parts as JSON, joined by newlines."""
    pieces = []
    for part in message.parts:
        if part.HasField("text"):
            pieces.append(part.text)
        elif part.HasField("data"):
            pieces.append(json.dumps(get_data_parts([part])[0], ensure_ascii=False))
    return "\n".join(pieces)


def check_new_message(params: SendMessageRequest) -> None:
    """What this agent takes, as A2A errors: one text (or JSON data) message per task."""
    message = params.message
    if message.task_id:
        raise UnsupportedOperationError(message="This agent takes one message per task; send a new message "
                                                "without taskId (a contextId may relate them)")
    if not any(p.HasField("text") or p.HasField("data") for p in message.parts):
        raise ContentTypeNotSupportedError(message="This agent reads text/plain and application/json parts only")
    text = message_text(message)
    if not text.strip():
        raise InvalidParamsError(message="The message has no text")
    if len(text.encode("utf-8")) > MAX_CONTENT_BYTES:
        raise InvalidParamsError(message=f"The message is longer than {MAX_CONTENT_BYTES} UTF-8 bytes")


def status_event(task_id: str, context_id: str, state: int, text: str | None = None) -> TaskStatusUpdateEvent:
    status = TaskStatus(state=state)
    status.timestamp.GetCurrentTime()
    if text:
        status.message.CopyFrom(Message(message_id=str(uuid.uuid4()), role=Role.ROLE_AGENT, task_id=task_id,
                                        context_id=context_id, parts=[Part(text=text)]))
    return TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=status)


@dataclass(frozen=True)
class Change:
    """Something the agent did to a task: ``working`` (saw the message), ``completed`` (answered with
    ``text``) or ``canceled`` (expired it, ``text`` says why)."""

    kind: str
    text: str | None = None

    @property
    def state(self) -> int:
        return {"working": TaskState.TASK_STATE_WORKING, "completed": TaskState.TASK_STATE_COMPLETED,
                "canceled": TaskState.TASK_STATE_CANCELED}[self.kind]

    def events(self, task_id: str, context_id: str) -> list:
        if self.kind == "completed":
            artifact = Artifact(artifact_id=str(uuid.uuid4()), name="answer", parts=[Part(text=self.text or "")])
            return [TaskArtifactUpdateEvent(task_id=task_id, context_id=context_id, artifact=artifact,
                                            last_chunk=True),
                    status_event(task_id, context_id, self.state)]
        return [status_event(task_id, context_id, self.state, self.text)]


def task_of(message: dict) -> str | None:
    """The A2A task of an inbox entry made by this bridge."""
    meta = (message.get("metadata") or {}).get("a2a")
    task_id = meta.get("task_id") if isinstance(meta, dict) else None
    return task_id if isinstance(task_id, str) else None


def message_of(task: Task) -> str | None:
    """The inbox message_id of a task (kept in the task's metadata)."""
    meta = task.metadata.fields.get("darkmatter")
    if meta is None or not meta.HasField("struct_value"):
        return None
    value = meta.struct_value.fields.get("message_id")
    return value.string_value if value is not None and value.string_value else None


class Executor(AgentExecutor):
    def __init__(self, bridge: Bridge):
        self.bridge = bridge

    async def execute(self, context: RequestContext, event_queue) -> None:
        await self.bridge.run(context, event_queue)

    async def cancel(self, context: RequestContext, event_queue) -> None:
        await event_queue.enqueue_event(status_event(context.task_id, context.context_id or "",
                                                     TaskState.TASK_STATE_CANCELED, "Canceled by the caller."))


class Handler(DefaultRequestHandler):
    """The SDK's handler, with what this agent accepts checked first and a blocking send bounded by
    ``DARKMATTER_A2A_BLOCK_SECONDS`` (the task is then returned as it is, still open)."""

    def __init__(self, bridge: Bridge, **kwargs: Any):
        super().__init__(**kwargs)
        self.bridge = bridge

    @validate_request_params
    async def on_message_send(self, params, context):
        check_new_message(params)
        if params.configuration.return_immediately:
            return await super().on_message_send(params, context)
        params.configuration.return_immediately = True
        result = await super().on_message_send(params, context)
        if isinstance(result, Task) and result.status.state in OPEN:
            settled = await self.bridge.store.wait(result.id, lambda t: t.status.state not in OPEN,
                                                   self.bridge.settings.block_seconds)
            if settled is not None:
                result = apply_history_length(settled, params.configuration)
        return result

    @validate_request_params
    async def on_message_send_stream(self, params, context):
        check_new_message(params)
        async for event in super().on_message_send_stream(params, context):
            yield event


class ContextBuilder(DefaultServerCallContextBuilder):
    """Carries the caller the guard identified into the SDK's call context (task ownership, sender id)."""

    def build(self, request: Request):
        context = super().build(request)
        context.state[CALLER_KEY] = request.scope.get(CALLER_KEY) or Caller()
        return context


class Claim:
    """The ``dm_claim_message`` answer for the bridge's inbox messages."""

    def __init__(self, bridge: Bridge):
        self.bridge = bridge

    async def respond(self, message: dict, response: str, metadata: dict) -> dict:
        task_id = task_of(message)
        task = await self.bridge.change(task_id, Change("completed", response)) if task_id else None
        if task is None:
            return {"delivery": "failed", "last_error": "the A2A task of this message no longer exists"}
        if task.status.state != TaskState.TASK_STATE_COMPLETED:
            return {"delivery": "failed",
                    "last_error": f"the A2A task is {state_name(task.status.state)}"}
        return {"delivery": "delivered"}

    async def expire(self, message: dict) -> None:
        task_id = task_of(message)
        if task_id:
            await self.bridge.change(task_id, Change("canceled", "The agent declined this message."))


class Bridge:
    """The inbound side for one node: settings, card, SDK handler and routes, task store and stream."""

    def __init__(self, node: Any):
        self.node = node
        self.settings = Settings()
        self.store = NodeTaskStore(self)
        self.stream = LocalEventStream()
        self.claim = Claim(self)
        self.live: dict[str, asyncio.Queue] = {}
        self._agent_side: collections.Counter[str] = collections.Counter()  # tasks the agent is ending
        self.card: AgentCard | None = None
        self._card_made_for: tuple = ()
        self.handler: Handler | None = None
        self.router: Router | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, settings: Settings) -> None:
        self.settings = settings
        self.store = NodeTaskStore(self)  # fresh asyncio objects for this run of the node
        self.stream = LocalEventStream()
        self.live.clear()
        state = self.node.state
        if not isinstance(state.get("a2a"), dict) or not isinstance(state["a2a"].get("tasks"), dict):
            state["a2a"] = {"tasks": {}, "outbound": {}}
            await self.node.save()  # a snapshot holding the containers the journal records point into
        state["a2a"].setdefault("outbound", {})
        self.card = cards.build_card(self.node, settings)
        self._card_made_for = self._card_key()
        self.handler = Handler(self, agent_executor=Executor(self), task_store=self.store, agent_card=self.card,
                               event_stream=self.stream)
        builder = ContextBuilder()
        rest = [r for r in create_rest_routes(self.handler, builder, path_prefix=cards.REST_SUBPATH)
                if isinstance(r, Route)]  # no tenant mount: it would catch every path
        routes = create_jsonrpc_routes(self.handler, cards.JSONRPC_SUBPATH, builder, enable_v0_3_compat=True)
        self.router = Router(routes=routes + rest, redirect_slashes=False)

    async def stop(self) -> None:
        self.router = None
        if self.handler is not None:
            await self.handler.aclose()
            self.handler = None

    def _card_key(self) -> tuple:
        return self.node.state.get("display_name"), self.node.state.get("bio"), self.node.base_url

    def refresh_card(self) -> None:
        """Re-sign the card when the name, bio or URL it shows changed (``darkmatter_update_bio``)."""
        if self.card is not None and self._card_made_for != self._card_key():
            self.card.CopyFrom(cards.build_card(self.node, self.settings))  # the handler holds this object
            self._card_made_for = self._card_key()

    # --- the task's executor --------------------------------------------------------------------

    async def run(self, context: RequestContext, event_queue) -> None:
        task_id, context_id = context.task_id or "", context.context_id or ""
        message = context.message
        if context.current_task is not None or message is None:
            raise UnsupportedOperationError(message="This agent takes one message per task")
        queue: asyncio.Queue = asyncio.Queue()
        self.live[task_id] = queue
        try:
            caller = caller_of(context.call_context)
            metadata = {"a2a": {"task_id": task_id, "context_id": context_id, "message_id": message.message_id}}
            try:
                entry = await external_message(self.node, caller.sender, message_text(message), metadata,
                                               transport=TRANSPORT)
            except ProtocolError as exc:
                await event_queue.enqueue_event(self._rejected(task_id, context_id, message, exc))
                return
            task = Task(id=task_id, context_id=context_id, history=[message],
                        status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
                        metadata={"darkmatter": {"message_id": entry["message_id"]}})
            task.status.timestamp.GetCurrentTime()
            await event_queue.enqueue_event(task)
            while True:
                change: Change = await queue.get()
                for event in change.events(task_id, context_id):
                    await event_queue.enqueue_event(event)
                if change.state in TERMINAL:
                    return
        finally:
            if self.live.get(task_id) is queue:
                del self.live[task_id]

    @staticmethod
    def _rejected(task_id: str, context_id: str, message: Message, exc: ProtocolError) -> Task:
        retry = exc.extra.get("retry_after")
        reason = {"rate_limited": f"too many messages; try again in {retry} s",
                  "capacity": "the agent's inbox is full; try again later",
                  "inactive": "the agent is inactive and takes no messages now"}.get(exc.code, exc.error)
        task = Task(id=task_id, context_id=context_id, history=[message],
                    metadata={"darkmatter": {"refused": exc.code, **({"retry_after": retry} if retry else {})}})
        task.status.CopyFrom(status_event(task_id, context_id, TaskState.TASK_STATE_REJECTED,
                                          f"Refused: {reason}.").status)
        return task

    # --- changes made by the agent --------------------------------------------------------------

    async def change(self, task_id: str, change: Change) -> Task | None:
        """Apply an agent-side change; return the task as it then is (None when it is gone)."""
        ending = change.state in TERMINAL
        if ending:
            self._agent_side[task_id] += 1
        try:
            queue = self.live.get(task_id)
            if queue is not None:
                queue.put_nowait(change)
                task = await self.store.wait(
                    task_id, lambda t: t.status.state == change.state or t.status.state in TERMINAL, CHANGE_WAIT)
                if task is None or task.status.state == change.state or task.status.state in TERMINAL:
                    return task
                if task_id in self.live:
                    log.warning("a2a: task %s did not record %s in time", task_id, change.kind)
                    return task
            return await self._write(task_id, change)
        finally:
            if ending:
                self._agent_side[task_id] -= 1
                if not self._agent_side[task_id]:
                    del self._agent_side[task_id]

    async def _write(self, task_id: str, change: Change) -> Task | None:
        """A change to a task no executor holds (after a restart): versioned writes, then stream events."""
        for _ in range(3):
            stored = await self.store.get(task_id, INTERNAL)
            if stored is None or stored.task.status.state in TERMINAL:
                return stored.task if stored else None
            manager = TaskManager(task_store=self.store, context=INTERNAL, task_id=task_id,
                                  context_id=stored.task.context_id, initial_message=None)
            try:
                for event in change.events(task_id, stored.task.context_id):
                    await manager.process(event)
                    await self.stream.publish(task_id, VersionedEvent(event=event, version=manager.current_version))
            except ConcurrentTaskModificationError:
                continue
            return await manager.get_task()
        stored = await self.store.get(task_id, INTERNAL)
        return stored.task if stored else None

    async def seen(self, message: dict) -> None:
        """The agent was shown a message: its task is now being worked on."""
        task_id = task_of(message)
        record = self.store.records.get(task_id) if task_id else None
        if record is None or record["task"].get("status", {}).get("state") != "TASK_STATE_SUBMITTED":
            return
        await self.change(task_id, Change("working"))

    # --- store side effects ---------------------------------------------------------------------

    def take_message(self, task: Task) -> tuple[int, dict] | None:
        """Take a finished task's message out of the inbox; return (index, entry) so it can be put back."""
        message_id = message_of(task)
        inbox = self.node.state["inbox"]
        for index, entry in enumerate(inbox):
            if entry["message_id"] == message_id and entry.get("transport") == TRANSPORT:
                del inbox[index]
                return index, entry
        return None

    def changing(self, task_id: str) -> bool:
        """Whether the agent is ending this task right now (respond or expire)."""
        return task_id in self._agent_side

    def finished(self, task: Task, message: dict | None, by_agent: bool) -> None:
        """A task reached a terminal state and that was saved. When the caller (not the agent) ended it while its
        message waited in the inbox, that message expired."""
        if message is not None and not by_agent:
            self.node.spawn(self.node.emit("dm_on_message_expired", message_id=message["message_id"],
                                           reason=f"the A2A caller's task was {state_name(task.status.state)}"),
                            name="a2a-expired")
        self.node.changed()

    # --- HTTP -----------------------------------------------------------------------------------

    def identify(self, scope: dict, headers: dict[str, str]) -> Caller:
        ip = client_ip(scope)
        proxied = any(h in headers for h in PROXY_HEADERS)
        loopback = bool(ip) and is_loopback_host(ip) and not proxied
        scheme, _, given = headers.get("authorization", "").partition(" ")
        token = self.node.token or ""
        has_token = bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode())
        return Caller(ip=ip, loopback=loopback, proxied=proxied, token=has_token)

    def refusal(self, scope: dict, headers: dict[str, str], caller: Caller) -> tuple | None:
        """Why an A2A request is refused before it reaches the SDK: (HTTP status, code, text[, retry_after]),
        or None."""
        if "origin" in headers:
            return 403, "forbidden", "Browser requests (with an Origin header) are refused"
        if self.node.bind_is_loopback and not self.node.host_expected(headers.get("host", "")):
            return 421, "misdirected", "Misdirected request: unexpected Host header"
        mode = self.settings.inbound
        if mode == "off":
            return 403, "forbidden", "A2A requests are switched off on this node (DARKMATTER_A2A_INBOUND=off)"
        if mode == "local" and not caller.trusted:
            return 401, "unauthorized", ("A2A requests from other machines need the node's bearer token "
                                         "(DARKMATTER_A2A_INBOUND=local)")
        try:
            self.node.rate.check("get_ip", "a2a:" + caller.source, 10.0 if caller.loopback else 1.0)
        except ProtocolError as exc:
            return 429, "rate_limited", "Rate limit exceeded", int(exc.extra.get("retry_after") or 1)
        return None

    async def asgi(self, scope, receive, send) -> None:
        """Everything under ``/a2a``: the guard (browser, Host, who may call, rate, body size), then the SDK."""
        path = scope.get("path", "")
        jsonrpc = path == cards.JSONRPC_PATH
        if scope["type"] != "http" or self.router is None:
            await _refuse(scope, receive, send, 503, "unavailable", "The A2A bridge is not running", jsonrpc)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        caller = self.identify(scope, headers)
        problem = self.refusal(scope, headers, caller)
        if problem is not None:
            await _refuse(scope, receive, send, *problem[:3], jsonrpc, *problem[3:])
            return
        body = b""
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            try:
                body = await read_body(Request(scope, receive), MAX_BODY)
                if body.strip():
                    json.loads(body.decode("utf-8"))  # the SDK's REST side answers 500 to bytes that are not UTF-8
            except ProtocolError as exc:
                await _refuse(scope, receive, send, exc.status, exc.code, exc.error, jsonrpc)
                return
            except ValueError:  # not UTF-8, not JSON
                await _refuse(scope, receive, send, 400, "invalid_json", "Invalid JSON body", jsonrpc)
                return
        scope[CALLER_KEY] = caller
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.router(scope, replay, send)


STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 408: "DEADLINE_EXCEEDED",
                413: "INVALID_ARGUMENT", 421: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


async def _refuse(scope, receive, send, status: int, code: str, text: str, jsonrpc: bool,
                  retry_after: int | None = None) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if jsonrpc:
        # NOTE: a JSON-RPC parse error is a 200 with -32700, as the SDK answers it; refusals keep their status.
        rpc_code = -32700 if code == "invalid_json" else -32600
        if code == "invalid_json":
            status = 200
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": rpc_code, "message": text, "data": {"code": code}}}
    else:
        body = {"error": {"code": status, "status": STATUS_NAMES.get(status, "UNKNOWN"), "message": text}}
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)

