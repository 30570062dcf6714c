"""Storage protocol and the group-commit persister with an append-only journal.

Durable and fast at once (docs/protocol.md §11.2: whatever a peer got a 200 for is on disk):

* ``await node.save()`` returns only when a snapshot taken *after* the caller's change is on disk.
  Every change made while one write is in flight rides on the next one (a group commit), and all file
  I/O runs off the event loop.
* Hot paths pass ``ops`` — small journal records such as ``("append", ["inbox"], entry)`` — instead of
  asking for a whole snapshot. They are appended to a journal and fsynced; the full snapshot is
  rewritten only when something without ops changed or the journal has grown past its limit. So
  accepting a message costs one small append, however large the inbox and sent store are.

Journal records carry a sequence number; the snapshot records the last one it includes, so a crash
between writing a snapshot and truncating the journal never applies a record twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

log = logging.getLogger(__name__)

JOURNAL_SEQ_KEY = "journal_seq"
Op = tuple  # ("set", path, value) | ("append", path, value) | ("del", path)


@runtime_checkable
class Storage(Protocol):
    name: str

    def load(self) -> dict[str, Any] | None:
        """Return the stored state (journal already applied), None when there is none; raise StateError
        when it is unusable. Called once at start-up, off the event loop."""

    async def commit(self, data: bytes) -> None:
        """Make ``data`` (a JSON document) the stored state, durably, and empty the journal."""

    async def append(self, records: bytes) -> None:
        """Append journal records (JSON lines) durably. Optional: without it every save is a snapshot."""

    def close(self) -> None:
        """Release resources. Called once at shutdown after the final commit."""


def apply_ops(state: dict, ops: Iterable[Op]) -> None:
    """Replay journal operations onto a loaded state. Unknown or inapplicable ops are skipped."""
    for op in ops:
        try:
            kind, path = op[0], op[1]
            target = state
            for key in path[:-1]:
                target = target[key]
            last = path[-1]
            if kind == "set":
                target[last] = op[2]
            elif kind == "append":
                target[last].append(op[2])
            elif kind == "del":
                target.pop(last, None)
        except (KeyError, IndexError, TypeError, AttributeError):
            log.warning("skipping a journal record that does not apply: %r", op[:2])


def parse_journal(journal: bytes) -> tuple[list[dict], int]:
    """The journal's records up to the first bad line, and how many bytes they span.

    A bad line is one torn by a crash mid-append: never acknowledged, since the ack waits for the fsync."""
    records: list[dict] = []
    good = 0
    for line in journal.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
            break
        records.append(record)
        good += len(line)
    return records, good


def replay(state: dict, journal: bytes) -> int:
    """Apply the records of `journal` newer than the snapshot's; return how many were applied."""
    base = state.get(JOURNAL_SEQ_KEY) or 0
    applied = 0
    for record in parse_journal(journal)[0]:
        if record["seq"] <= base:
            continue
        apply_ops(state, record.get("ops") or [])
        state[JOURNAL_SEQ_KEY] = record["seq"]
        applied += 1
    return applied


class Persister:
    """Coalescing writer over a storage. One per node."""

    def __init__(self, storage: Storage, snapshot: Callable[[], dict], journal_limit: int = 4 * 1024 * 1024):
        self.storage = storage
        self._snapshot = snapshot
        self._journal = callable(getattr(storage, "append", None))
        self._journal_limit = journal_limit
        self._journal_bytes = 0
        self._full_needed = False
        self._pending_ops: list[list[Op]] = []
        self._seq = int(snapshot().get(JOURNAL_SEQ_KEY) or 0)
        self._dirty = 0
        self._durable = 0
        self._writer: asyncio.Task | None = None
        self._changed = asyncio.Condition()
        self.commits = 0
        self.appends = 0
        self.error: BaseException | None = None

    def mark(self, ops: list[Op] | None = None) -> int:
        """Record a change that should reach disk soon, without waiting for it."""
        self._dirty += 1
        if ops is not None and self._journal:
            self._pending_ops.append(ops)
        else:
            self._full_needed = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        return self._dirty

    async def save(self, ops: list[Op] | None = None) -> None:
        """Return once the current state (including the caller's change) is durable."""
        generation = self.mark(ops)
        async with self._changed:
            await self._changed.wait_for(lambda: self._durable >= generation or self._failed())
        if self._durable < generation and self.error is not None:
            raise OSError(f"state could not be written: {self.error}") from self.error

    def _failed(self) -> bool:
        return self.error is not None and (self._writer is None or self._writer.done())

    def _encode_snapshot(self) -> bytes:
        state = self._snapshot()
        state[JOURNAL_SEQ_KEY] = self._seq
        return json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def _encode_ops(self, batch: list[list[Op]]) -> bytes:
        lines = []
        for ops in batch:
            self._seq += 1
            lines.append(json.dumps({"seq": self._seq, "ops": ops}, ensure_ascii=False,
                                    separators=(",", ":")).encode("utf-8"))
        return b"\n".join(lines) + b"\n"

    async def _write_loop(self) -> None:
        while self._durable < self._dirty:
            generation = self._dirty
            full = self._full_needed or self._journal_bytes >= self._journal_limit
            batch, self._pending_ops = self._pending_ops, []
            try:
                if full:
                    self._full_needed = False
                    await self.storage.commit(self._encode_snapshot())
                    self._journal_bytes = 0
                    self.commits += 1
                else:
                    data = self._encode_ops(batch)
                    await self.storage.append(data)  # type: ignore[attr-defined]
                    self._journal_bytes += len(data)
                    self.appends += 1
            except Exception as exc:  # noqa: BLE001 - reported to every waiter
                log.error("state write failed: %s", exc)
                self.error = exc
                self._full_needed = True  # the next attempt rewrites everything
                async with self._changed:
                    self._changed.notify_all()
                return
            self.error = None
            self._durable = generation
            async with self._changed:
                self._changed.notify_all()

    async def flush(self) -> None:
        """Write a full snapshot (emptying the journal) and wait for it."""
        self._full_needed = True
        await self.save()
