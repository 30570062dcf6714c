"""Where inbound A2A tasks live: a versioned SDK task store kept in the node's state, and an in-process
event stream.

The tasks are in ``node.state["a2a"]["tasks"]`` (task_id -> record), so they are written by the node's own
persister (journal records on the hot path) and survive a restart. The SDK's request handler runs a task's
executor while this process holds it; after a restart the task is "running elsewhere" for the SDK (the
agent answers over MCP, whenever it does), which is exactly what its versioned store and event stream are
for: a later change is a versioned write here plus an event on the stream, and the SDK's handler serves
``SubscribeToTask`` and ``CancelTask`` from them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncGenerator, Callable

from a2a.server.cluster import (ConcurrentTaskModificationError, StoredTask, TaskEventStream, TaskVersion,
                                VersionedEvent, VersionedTaskStore)
from a2a.server.context import ServerCallContext
from a2a.types import ListTasksRequest, ListTasksResponse, Task, TaskState
from a2a.utils.constants import DEFAULT_LIST_TASKS_PAGE_SIZE
from a2a.utils.errors import InternalError, InvalidParamsError
from a2a.utils.task import ListTasksCursor, decode_list_tasks_cursor, encode_list_tasks_cursor
from google.protobuf.json_format import MessageToDict, ParseDict

from darkmatter.api import now_iso

if TYPE_CHECKING:
    from darkmatter_a2a_bridge.inbound import Bridge

log = logging.getLogger("darkmatter_a2a_bridge")

TERMINAL = {TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_CANCELED, TaskState.TASK_STATE_FAILED,
            TaskState.TASK_STATE_REJECTED}
OPEN = {TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING}
CALLER_KEY = "darkmatter_caller"


@dataclass(frozen=True)
class Caller:
    """Who sent an A2A request. ``owner`` scopes tasks: callers on this machine and token holders share
    ``local`` and see every task; anyone else (``DARKMATTER_A2A_INBOUND=on``) sees only the tasks created
    from its own address."""

    ip: str = ""
    loopback: bool = False
    proxied: bool = False  # came through a proxy (Forwarded, X-Forwarded-For, X-Real-IP): ip is the proxy's
    token: bool = False
    internal: bool = False  # the bridge itself, on the agent's behalf

    @property
    def trusted(self) -> bool:
        return self.internal or self.loopback or self.token

    @property
    def source(self) -> str:
        """Where the request came from; every request through a proxy shares one source (docs/protocol.md §2.1)."""
        return ("proxied:" if self.proxied else "") + (self.ip or "unknown")

    @property
    def owner(self) -> str:
        return "local" if self.trusted else self.source

    @property
    def sender(self) -> str:
        """The pseudo-peer id of inbox messages from this caller (one per source)."""
        return "a2a:" + self.source


INTERNAL = ServerCallContext(state={CALLER_KEY: Caller(internal=True)})


def caller_of(context: ServerCallContext | None) -> Caller:
    caller = context.state.get(CALLER_KEY) if context is not None else None
    return caller if isinstance(caller, Caller) else Caller()


def state_name(state: int) -> str:
    """``completed`` for ``TASK_STATE_COMPLETED``."""
    return TaskState.Name(state).removeprefix("TASK_STATE_").lower()


def task_from(record: dict) -> Task:
    return ParseDict(record["task"], Task(), ignore_unknown_fields=True)


def _sort_key(task: Task) -> tuple[bool, int, str]:
    stamped = task.status.HasField("timestamp")
    return stamped, task.status.timestamp.ToNanoseconds() if stamped else 0, task.id


class NodeTaskStore(VersionedTaskStore):
    """The SDK's versioned task store over ``node.state["a2a"]["tasks"]``; durable when ``save`` returns."""

    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.changed = asyncio.Condition()

    @property
    def records(self) -> dict[str, dict]:
        return self.bridge.node.state["a2a"]["tasks"]

    def _visible(self, record: dict, context: ServerCallContext | None) -> bool:
        caller = caller_of(context)
        return caller.trusted or record.get("owner") == caller.owner

    async def get(self, task_id: str, context: ServerCallContext) -> StoredTask | None:
        record = self.records.get(task_id)
        if record is None or not self._visible(record, context):
            return None
        return StoredTask(task_from(record), TaskVersion(record["version"]))

    async def save(self, task: Task, *, event: Any, prev: Task | None, prev_version: TaskVersion,
                   context: ServerCallContext) -> TaskVersion:
        records = self.records
        old = records.get(task.id)
        if old is not None and not self._visible(old, context):
            raise ConcurrentTaskModificationError(task.id)
        was = task_from(old).status.state if old is not None else None
        if task.status.state == TaskState.TASK_STATE_CANCELED:
            # The SDK's rule: a cancel overwrites any open task without a version check.
            if old is None or was in TERMINAL:
                raise ConcurrentTaskModificationError(task.id)
        elif prev_version != (TaskVersion(old["version"]) if old is not None else TaskVersion.MISSING):
            raise ConcurrentTaskModificationError(task.id)
        if not task.status.HasField("timestamp"):
            task.status.timestamp.GetCurrentTime()
        record = {"task": MessageToDict(task), "version": (old["version"] if old else 0) + 1,
                  "owner": old["owner"] if old else caller_of(context).owner, "updated_at": now_iso()}
        records[task.id] = record
        finished = task.status.state in TERMINAL and was not in TERMINAL
        # A finished task's message leaves the inbox (nobody waits for its answer any more), and old finished
        # tasks make room: both in the same state write, undone together when it fails.
        taken = self.bridge.take_message(task) if finished else None
        by_agent = self.bridge.changing(task.id)  # read before any await: the agent's call may return meanwhile
        evicted = self._evict() if finished else {}
        try:
            full = taken is not None or bool(evicted)
            await self.bridge.node.save(None if full else [("set", ["a2a", "tasks", task.id], record)])
        except OSError:
            if old is None:
                records.pop(task.id, None)
            else:
                records[task.id] = old
            records.update(evicted)
            if taken is not None:
                self.bridge.node.state["inbox"].insert(*taken)
            raise InternalError(message="This node cannot save its state right now; nothing was recorded.") from None
        async with self.changed:
            self.changed.notify_all()
        if finished:
            self.bridge.finished(task, taken[1] if taken else None, by_agent)
        return TaskVersion(record["version"])

    def _evict(self) -> dict[str, dict]:
        """Keep at most ``tasks_kept`` finished tasks: rejected and canceled ones go first, then the oldest.
        Returns what it removed."""
        records = self.records
        finished = [(tid, r) for tid, r in records.items() if task_from(r).status.state in TERMINAL]
        extra = len(finished) - self.bridge.settings.tasks_kept
        if extra <= 0:
            return {}
        rank = {TaskState.TASK_STATE_REJECTED: 0, TaskState.TASK_STATE_CANCELED: 1}
        finished.sort(key=lambda item: (rank.get(task_from(item[1]).status.state, 2), item[1]["updated_at"]))
        evicted = dict(finished[:extra])
        for task_id in evicted:
            del records[task_id]
        return evicted

    async def wait(self, task_id: str, done: Callable[[Task], bool], timeout: float) -> Task | None:
        """Wait until the stored task satisfies ``done`` (or is gone), at most ``timeout`` seconds; return it."""
        def check() -> bool:
            record = self.records.get(task_id)
            return record is None or done(task_from(record))

        try:
            async with asyncio.timeout(timeout):
                async with self.changed:
                    await self.changed.wait_for(check)
        except TimeoutError:
            pass
        record = self.records.get(task_id)
        return task_from(record) if record is not None else None

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        tasks = [task_from(r) for r in self.records.values() if self._visible(r, context)]
        if params.context_id:
            tasks = [t for t in tasks if t.context_id == params.context_id]
        if params.status:
            tasks = [t for t in tasks if t.status.state == params.status]
        if params.HasField("status_timestamp_after"):
            after = params.status_timestamp_after.ToNanoseconds()
            tasks = [t for t in tasks if t.status.timestamp.ToNanoseconds() >= after]
        tasks.sort(key=_sort_key, reverse=True)
        start = 0
        if params.page_token:
            cursor = decode_list_tasks_cursor(params.page_token)
            if cursor is None:
                raise InvalidParamsError(message="Invalid page token")
            start = next((i for i, t in enumerate(tasks) if _sort_key(t) < cursor.sort_key()), len(tasks))
        size = params.page_size or DEFAULT_LIST_TASKS_PAGE_SIZE
        page = tasks[start:start + size]
        token = None
        if start + size < len(tasks) and page:
            stamped, stamp, last_id = _sort_key(page[-1])
            token = encode_list_tasks_cursor(ListTasksCursor(timestamp_ns=stamp if stamped else None,
                                                             task_id=last_id))
        return ListTasksResponse(tasks=page, next_page_token=token, total_size=len(tasks), page_size=size)

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        record = self.records.get(task_id)
        if record is None or not self._visible(record, context):
            return
        del self.records[task_id]
        await self.bridge.node.save([("del", ["a2a", "tasks", task_id])])


class LocalEventStream(TaskEventStream):
    """Task events for subscribers in this process. The last few events of recent tasks are kept, so a
    subscriber that read a task just before an event was published still gets it."""

    RECENT_TASKS = 256
    RECENT_EVENTS = 16
    QUEUE = 256

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue]] = {}
        self._recent: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    async def publish(self, task_id: str, event: VersionedEvent) -> None:
        recent = self._recent.pop(task_id, None) or collections.deque(maxlen=self.RECENT_EVENTS)
        recent.append(event)
        self._recent[task_id] = recent
        while len(self._recent) > self.RECENT_TASKS:
            self._recent.popitem(last=False)
        for queue in list(self._subscribers.get(task_id, ())):
            if queue.full():  # a subscriber this far behind is dropped rather than holding the others up
                self._subscribers[task_id].discard(queue)
                continue
            queue.put_nowait(event)

    async def subscribe(self, task_id: str, *, after: TaskVersion) -> AsyncGenerator[VersionedEvent, None]:
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.QUEUE)
        self._subscribers.setdefault(task_id, set()).add(queue)
        seen: set[int] = set()
        try:
            for event in list(self._recent.get(task_id, ())):
                if event.version.is_after(after):
                    seen.add(id(event))
                    yield event
            while True:
                event = await queue.get()
                if id(event) not in seen and event.version.is_after(after):
                    yield event
        finally:
            subscribers = self._subscribers.get(task_id)
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    del self._subscribers[task_id]

    async def destroy(self, task_id: str) -> None:
        self._recent.pop(task_id, None)
