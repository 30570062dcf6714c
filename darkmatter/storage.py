"""Storage protocol and the group-commit persister.

A storage persists whole-state snapshots. The :class:`Persister` makes them durable and fast at once:
``await persister.save()`` returns only when a snapshot taken *after* the caller's change is on disk,
and every change made while one write is in flight rides on the next one (a group commit). So a burst
of 100 accepted messages costs a handful of fsyncs, all of them off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class Storage(Protocol):
    name: str

    def load(self) -> dict[str, Any] | None:
        """Return the stored state, None when there is none; raise StateError when it is unusable.

        Called once at start-up, off the event loop."""

    async def commit(self, data: bytes) -> None:
        """Make ``data`` (a JSON document) the stored state, durably, before returning."""

    def close(self) -> None:
        """Release resources. Called once at shutdown after the final commit."""


class Persister:
    """Coalescing writer over a storage. One per node."""

    def __init__(self, storage: Storage, snapshot: Callable[[], Any]):
        self.storage = storage
        self._snapshot = snapshot
        self._dirty = 0
        self._durable = 0
        self._writer: asyncio.Task | None = None
        self._changed = asyncio.Condition()
        self.commits = 0
        self.error: BaseException | None = None

    def mark(self) -> int:
        """Record a change that should reach disk soon, without waiting for it."""
        self._dirty += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        return self._dirty

    async def save(self) -> None:
        """Return once the current state (including the caller's change) is durable."""
        generation = self.mark()
        async with self._changed:
            await self._changed.wait_for(lambda: self._durable >= generation or self._failed(generation))
        if self._durable < generation and self.error is not None:
            raise OSError(f"state could not be written: {self.error}") from self.error

    def _failed(self, generation: int) -> bool:
        return self.error is not None and (self._writer is None or self._writer.done())

    async def _write_loop(self) -> None:
        while self._durable < self._dirty:
            generation = self._dirty
            data = json.dumps(self._snapshot(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            try:
                await self.storage.commit(data)
            except Exception as exc:  # noqa: BLE001 - reported to every waiter
                log.error("state write failed: %s", exc)
                self.error = exc
                async with self._changed:
                    self._changed.notify_all()
                return
            self.error = None
            self._durable = generation
            self.commits += 1
            async with self._changed:
                self._changed.notify_all()

    async def flush(self) -> None:
        if self._durable < self._dirty:
            await self.save()
        elif self._writer is not None:
            await asyncio.shield(self._writer)
