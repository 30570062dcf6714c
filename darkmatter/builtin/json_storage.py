"""The JSON state file of docs/protocol.md §11: atomic snapshots, an append-only journal beside it
(``<state>.journal``, see ``darkmatter/storage.py``), 0600, corruption kept aside."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from darkmatter import hookimpl
from darkmatter.state import StateError, check_loaded, corrupt_copy_name, is_02, make_private_dir
from darkmatter.storage import parse_journal, replay

log = logging.getLogger(__name__)

# An append (write + fsync) that has lately taken less than this runs on the event loop (see append).
INLINE_APPEND_BELOW = 0.001  # seconds
INLINE_APPEND_MAX = 64 * 1024  # bytes


class JsonFileStorage:
    """One JSON document per node, replaced atomically on every commit."""

    name = "json"

    def __init__(self, path: Path, recovery: str | None = None):
        self.path = Path(path)
        self.journal_path = self.path.with_name(self.path.name + ".journal")
        self.recovery = recovery
        self._backup_02 = False
        self._writer = FileWriter(f"state-{self.path.name}")
        self._append_s: float | None = None  # moving average of an append's duration, once measured
        self.inline_below = INLINE_APPEND_BELOW
        self.inline_appends = 0  # appends that ran on the event loop

    def _prepare_dir(self) -> None:
        directory = self.path.parent
        make_private_dir(directory)
        warn_if_shared(directory)
        mode = directory.stat().st_mode & 0o777
        if mode & 0o077 and directory.name == "state" and directory.parent.name == ".darkmatter":
            log.warning("state directory %s had mode %o; tightening to 0700", directory, mode)
            os.chmod(directory, 0o700)

    def _remove_stale_temps(self) -> None:
        """Delete temporary files left by a writer that died mid-write (§11.2 step 1 names them)."""
        for tmp in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            pid_text = tmp.name[len(f".{self.path.name}.tmp-"):].split("-", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
                continue  # NOTE: a live writer's file is in flight; only a dead writer's is stale
            with contextlib.suppress(OSError):
                tmp.unlink()

    def load(self) -> dict[str, Any] | None:
        self._prepare_dir()
        self._remove_stale_temps()
        try:
            raw_bytes = _read_nofollow(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc.strerror}") from None
        try:
            raw = json.loads(raw_bytes.decode("utf-8"))
            problem = check_loaded(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            problem = f"it is not valid JSON ({type(exc).__name__})"
        if problem:
            copy = corrupt_copy_name(self.path)
            _write_private(copy, raw_bytes)
            if self.recovery == "new-identity":
                log.warning("state file %s is unusable (%s); kept a copy at %s and starting a new identity "
                            "because DARKMATTER_STATE_RECOVERY=new-identity", self.path, problem, copy)
                return None
            raise StateError(
                f"The state file {self.path} is unusable: {problem}. It was left in place and a copy was "
                f"kept at {copy}. Fix or restore the file, or start with a new identity by setting "
                f"DARKMATTER_STATE_RECOVERY=new-identity (the copy is kept).")
        # NOTE: only a usable file is touched; a corrupt one stays exactly as it was (§11.4).
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("state file %s had mode %o; tightening to 0600", self.path, mode)
            os.chmod(self.path, 0o600)
        if is_02(raw):
            self._backup_02 = True
        try:
            journal = _read_nofollow(self.journal_path)
        except FileNotFoundError:
            journal = b""
        if journal:
            applied = replay(raw, journal)
            log.info("replayed %d journal record(s) from %s", applied, self.journal_path)
            self._cut_torn_tail(journal)
        return raw

    def _cut_torn_tail(self, journal: bytes) -> None:
        """Drop what replay() stopped at (a line torn by a crash mid-append, never acknowledged).

        NOTE: without this, the next append would continue the torn line, and replay() stops at the first
        bad line: every record acknowledged after the restart would be lost at the next load."""
        good = parse_journal(journal)[1]
        if good == len(journal) and journal.endswith(b"\n"):
            return
        dropped = journal[good:]
        if b"\n" in dropped.rstrip(b"\n"):
            # More than one torn line is not a crash mid-append: keep the evidence.
            copy = corrupt_copy_name(self.journal_path)
            _write_private(copy, journal)
            log.warning("journal %s is damaged after %d good byte(s); kept a copy at %s and dropped the rest",
                        self.journal_path, good, copy)
        else:
            log.warning("journal %s ends with %d byte(s) of a torn record (a crash mid-write); dropping them",
                        self.journal_path, len(dropped))
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, good)
            if good and not journal[:good].endswith(b"\n"):
                os.pwrite(fd, b"\n", good)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, data: bytes) -> None:
        directory = self.path.parent
        if self._backup_02:
            backup = self.path.with_name(self.path.name + ".bak-0.2")
            if not backup.exists():
                _write_private(backup, self.path.read_bytes())
            self._backup_02 = False
        tmp = directory / f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        # The snapshot now holds every journal record (its journal_seq says so): start a new journal.
        if self.journal_path.exists():
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _append(self, records: bytes) -> None:
        """Append every byte or none: a short write (disk full) is rolled back before the error rises,
        so a record is never acknowledged half-written and later appends never continue a torn line."""
        # NOTE: opened per append, not kept open: a descriptor opened earlier would keep writing to a file
        # whose directory has since become read-only, and the error must show while the disk is unwritable.
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(records)
                while view:
                    written = os.write(fd, view)
                    if written <= 0:
                        raise OSError(errno.ENOSPC, "no space left for the state journal")
                    view = view[written:]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                raise
        finally:
            os.close(fd)

    def _timed_append(self, records: bytes) -> None:
        started = time.perf_counter()
        self._append(records)
        took = time.perf_counter() - started
        self._append_s = took if self._append_s is None else 0.8 * self._append_s + 0.2 * took

    # Appends and commits never overlap (one writer loop per node).
    async def append(self, records: bytes, *, waiters: int = 1) -> None:
        """Append journal records durably. Commits, appends that several saves wait for (``waiters``, see
        ``Storage.append``), appends nobody waits for, and appends to a disk whose fsync is slow (or not yet
        measured) run on this storage's own writer thread; a small append that one save waits for, whose
        recent average is under INLINE_APPEND_BELOW, runs right here, on the event loop.

        NOTE: the hand-off to the thread and back cost about as much as the fsync itself on a fast disk
        (~0.2 ms each, measured), on the path of every acknowledged message and every step of a hop; holding
        the loop for well under a millisecond is cheaper while nothing else waits for it. Several saves in
        one append mean that requests arrive faster than the disk takes them (the writer group-commits
        whatever came in during the last write): then the loop has other requests to serve, and holding it
        through the fsync cost up to a fifth of the messages/s at 16 concurrent senders. The number of records
        is no such sign: one request's save usually carries a few deferred changes along (read marks,
        delivery bookkeeping; in a trace of the roundtrip bench nearly every step's save did), so counting
        records sent those appends to the thread too. One slow fsync moves the average over the bound and
        later appends back to the thread, where they are measured until the disk is fast again."""
        if (waiters == 1 and self._append_s is not None and self._append_s < self.inline_below
                and len(records) <= INLINE_APPEND_MAX and self._writer.idle):
            self._timed_append(records)
            self.inline_appends += 1
            return
        await self._writer.run(self._timed_append, records)

    async def commit(self, data: bytes) -> None:
        await self._writer.run(self._write, data)

    def close(self) -> None:
        self._writer.stop()


class FileWriter:
    """One thread that runs a storage's blocking writes, one at a time, off the event loop.

    NOTE: the hand-off to the default executor (submit, its idle-thread bookkeeping, chained futures) cost
    about twice what a plain queue and ``call_soon_threadsafe`` cost, once per acknowledged message when
    messages come one at a time. The thread starts on first use and ends after ``IDLE`` seconds without work
    (a process hosting many nodes keeps no idle thread per node)."""

    IDLE = 30.0

    def __init__(self, name: str):
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._busy = 0  # jobs queued or running, guarded by _lock

    async def run(self, fn, *args):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._busy += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((loop, future, fn, args))
        return await future

    def _serve(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=self.IDLE)
            except queue.Empty:
                with self._lock:
                    if self._busy == 0:
                        self._thread = None
                        return
                continue
            if job is None:
                with self._lock:
                    if self._busy == 0:
                        self._thread = None
                        return
                continue
            loop, future, fn, args = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            with self._lock:
                self._busy -= 1
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    @property
    def idle(self) -> bool:
        """No job queued or running."""
        return self._busy == 0

    def stop(self) -> None:
        """Let the thread end once its queued jobs are done."""
        if self._thread is not None:
            self._queue.put(None)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _write_private(path: Path, data: bytes) -> None:
    """Write a copy of state bytes (it holds the private key): 0600 from the first byte, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def warn_if_shared(directory: Path) -> bool:
    """Log a warning when the state directory is shared with other users (world- or group-writable, such as
    /tmp, or owned by someone else): they could plant or swap files there. Returns whether it is shared."""
    try:
        info = directory.stat()
    except OSError:
        return False
    shared = bool(info.st_mode & 0o022) or info.st_uid != os.geteuid()
    if shared:
        log.warning("the state directory %s is shared with other users (mode %o, owner uid %d): anyone who can "
                    "write there can tamper with this node's files; set DARKMATTER_STATE_FILE to a path in a "
                    "private directory", directory, info.st_mode & 0o7777, info.st_uid)
    return shared


def _read_nofollow(path: Path) -> bytes:
    """Read a state file without following a symlink planted at its path (another user's link in a shared
    directory must not make the node read, then rewrite, a file of the attacker's choosing)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


@hookimpl
def dm_register_storage(register, node):
    register(JsonFileStorage(node.config.state_file, node.config.state_recovery))
