"""The persistent outbox of docs/protocol.md §5.2: every outbound delivery, retried with backoff.

Entries live in ``state["outbox"]`` with **unsigned** payloads; each attempt re-reads the connection's
URL and signs afresh. Transient failures (408/425/429/5xx, connect errors, timeouts) are retried after
min(60 s, 2^(n-1) s) ±20 %, honouring Retry-After, until the deadline; then the entry fails. Connect-class
failures towards a connection trigger peer_lookup recovery (§6.2) before the next attempt.

Attempts run CONCURRENCY at a time; one still unanswered after SLOT_SECONDS stops counting (a hung peer
must not starve the others), a recipient with a retry or a hung attempt in flight gets no further
attempts until it ends, and a recipient whose URL changed since the last attempt is retried at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from typing import TYPE_CHECKING, Callable

from darkmatter.identity import v1_string, v2_message, v2_webhook_update
from darkmatter.mesh import healing
from darkmatter.mesh.dispatch import call, deliver
from darkmatter.mesh.transport import SMALL, Reply
from darkmatter.wire import ProtocolError, endpoint, now_iso, webhook_problem

if TYPE_CHECKING:
    from darkmatter.node import Node

# Called with (node, entry, reply) after an attempt that will be retried, and after an entry finished; returns
# the journal ops of what it changed in the state (docs: darkmatter/storage.py), or None for "snapshot it all".
Callback = Callable[["Node", dict, Reply], "list | None"]

log = logging.getLogger(__name__)

OUTBOX_CAP = 500
CONCURRENCY = 16
SLOT_SECONDS = 1.0  # an attempt still waiting for its answer after this long no longer counts against CONCURRENCY


def entry_path(entry: dict) -> list:
    """The journal path of an outbox entry (darkmatter/storage.py)."""
    return ["outbox", {"id": entry["id"]}]


def append_op(entry: dict) -> tuple:
    """The journal op that persists a new outbox entry."""
    return ("append", ["outbox"], entry)


class Outbox:
    """The node's outbox. ``on_progress`` and ``on_finished`` report outcomes to whoever filled it (the
    outbound operations); the outbox itself knows nothing of what its entries mean."""

    def __init__(self, node: Node, on_progress: Callback, on_finished: Callback):
        self.node = node
        self.on_progress = on_progress
        self.on_finished = on_finished
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task] = {}
        self._done: dict[str, asyncio.Future] = {}
        self._attempted: dict[str, asyncio.Event] = {}
        self._sem = asyncio.Semaphore(CONCURRENCY)
        self._recovering = asyncio.Semaphore(1)
        self._tried_url: dict[str, str | None] = {}  # entry id -> the recipient URL its last attempt used
        self._sending: dict[str, tuple] = {}  # entry id -> (recipient, monotonic start, is a retry), messages only
        self._worker: asyncio.Task | None = None

    @property
    def entries(self) -> list[dict]:
        return self.node.state["outbox"]

    def start(self) -> None:
        # Restarts: message/forward entries whose recipient is gone fail (§5.2).
        for entry in list(self.entries):
            if entry["kind"] in ("message", "forward") and entry.get("target_agent_id") not in self.node.connections:
                self.finish(entry, "failed", Reply(None, error="recipient is no longer a connection"))
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="outbox")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    # --- queueing ----------------------------------------------------------------------------

    def add(self, kind: str, payload: dict, *, target_agent_id: str | None = None, url: str | None = None,
            message_id: str | None = None, deadline_seconds: float | None = None) -> dict:
        """Queue an entry and start its first attempt at once (on the next turn of the event loop).

        The entry is not persisted here: the caller marks ``("append", ["outbox"], entry)`` (see
        :func:`append_op`) in the same synchronous step and awaits the save before acknowledging. The first
        attempt and that save run side by side, so the fsync overlaps the network round trip."""
        if len(self.entries) >= OUTBOX_CAP:
            raise ProtocolError(429, "capacity", "Outbox is full; try again later")
        now = time.time()
        retry = self.node.config.delivery_retry_seconds if deadline_seconds is None else deadline_seconds
        entry = {"id": "out-" + secrets.token_hex(8), "kind": kind, "target_agent_id": target_agent_id,
                 "url": url, "message_id": message_id, "payload": payload, "attempts": 0,
                 "next_attempt_at": now, "deadline": now + retry, "state": "queued", "last_status": None,
                 "last_error": None, "created_at": now_iso()}
        self.entries.append(entry)
        self._done[entry["id"]] = asyncio.get_running_loop().create_future()
        self._attempted[entry["id"]] = asyncio.Event()
        # NOTE: starting the attempt here saves the worker's wake-up and its scan of every entry; the rules
        # the worker applies to a new entry (not in flight, due now) hold, and a stuck recipient waits.
        if self._worker is not None and not (kind in ("message", "forward") and target_agent_id in self._stuck_targets()):
            self._launch(entry)
        else:
            self._wake.set()
        return entry

    async def wait_first_attempt(self, entry: dict, timeout: float = 15.0) -> str:
        """Wait until the entry finished or its first attempt came back; return its state."""
        event = self._attempted.get(entry["id"])
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return entry["state"]

    async def wait(self, entry: dict, timeout: float = 15.0) -> str:
        """Wait up to `timeout` for the entry to finish; return its state (queued/delivered/failed)."""
        future = self._done.get(entry["id"])
        if future is None:
            return entry["state"]
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            pass
        return entry["state"]

    def kick(self) -> None:
        self._wake.set()

    # --- worker ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = time.time()
            soonest = None
            stuck = self._stuck_targets()
            for entry in list(self.entries):
                if entry["id"] in self._inflight:
                    continue
                if entry["kind"] in ("message", "forward") and entry.get("target_agent_id") in stuck:
                    continue  # tried again when the stuck attempt ends (_attempt_done wakes this loop)
                if entry["next_attempt_at"] <= now or self._moved(entry):
                    self._launch(entry)
                elif soonest is None or entry["next_attempt_at"] < soonest:
                    soonest = entry["next_attempt_at"]
            timeout = None if soonest is None else max(0.01, soonest - time.time())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _stuck_targets(self) -> set:
        """Recipients with a message attempt that is a retry (the recipient failed before) or unanswered for
        over SLOT_SECONDS (a hung peer): further messages to them wait for its outcome instead of opening more
        connections that would fail or hang as well, and leave the slots to recipients that answer."""
        now = time.monotonic()
        return {target for target, started, retry in self._sending.values()
                if target and (retry or now - started > SLOT_SECONDS)}

    def _moved(self, entry: dict) -> bool:
        """The recipient's URL changed since the entry's last attempt (a verified peer_update or a peer_lookup
        recovery): the retry need not wait out its backoff, which was meant for the old address."""
        tried = self._tried_url.get(entry["id"])
        if tried is None:
            return False
        conn = self.node.connections.get(entry.get("target_agent_id") or "")
        return conn is not None and conn.get("agent_url") != tried

    def _launch(self, entry: dict) -> None:
        task = asyncio.get_running_loop().create_task(self._attempt(entry))
        self._inflight[entry["id"]] = task
        task.add_done_callback(lambda t, eid=entry["id"]: self._attempt_done(eid))

    def _attempt_done(self, entry_id: str) -> None:
        self._inflight.pop(entry_id, None)
        self._sending.pop(entry_id, None)
        self._wake.set()

    @contextlib.asynccontextmanager
    async def _slot(self):
        """One of the CONCURRENCY attempt slots, held until the attempt ends or for SLOT_SECONDS, whichever
        comes first. NOTE: a peer that accepts connections and never answers keeps an attempt open until the
        15 s request timeout; holding the slot all that time let a few hung peers starve every other
        delivery (a second broadcast to 50 peers with 10 hung ones reached the live 40 after 20-45 s)."""
        await self._sem.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._sem.release()

        timer = asyncio.get_running_loop().call_later(SLOT_SECONDS, release)
        try:
            yield
        finally:
            timer.cancel()
            release()

    async def _attempt(self, entry: dict) -> None:
        async with self._slot():
            if entry["kind"] in ("message", "forward"):
                self._sending[entry["id"]] = (entry.get("target_agent_id"), time.monotonic(), entry["attempts"] > 0)
            if entry not in self.entries:
                return
            if time.time() > entry["deadline"] and entry["attempts"] > 0:
                self.finish(entry, "failed", Reply(None, error=entry.get("last_error") or "retry deadline passed"))
                return
            entry["attempts"] += 1
            try:
                reply = await self._send(entry)
            except ProtocolError as exc:
                reply = Reply(None, error=exc.error, error_kind="invalid")
            except Exception as exc:  # noqa: BLE001 - never lose the entry to a bug in one attempt
                log.exception("outbox attempt failed unexpectedly")
                reply = Reply(None, error=f"internal error: {type(exc).__name__}", error_kind="other")
            entry["last_status"] = reply.status
            entry["last_error"] = None if reply.ok else reply.describe()
            entry["transport"] = reply.transport
            if "acknowledged" in reply.extra:  # §9.3: fire-and-forget frames to 0.2 peers
                entry["acknowledged"] = reply.extra["acknowledged"]
            kind = reply.classification
            race = kind == "failed" and not_on_route_yet(entry, reply)
            if race:
                kind = "transient"
            if kind == "transient":
                delay = min(60.0, 2.0 ** (entry["attempts"] - 1)) * random.uniform(0.8, 1.2)
                if race and entry["attempts"] == 1:  # the forwarder's update is most likely a moment away
                    delay = ROUTE_RACE_FIRST_RETRY * random.uniform(0.8, 1.2)
                if reply.retry_after:
                    delay = max(delay, min(reply.retry_after, 600.0))
                if time.time() + delay > entry["deadline"]:
                    self.finish(entry, "failed", reply)
                    return
                entry["next_attempt_at"] = time.time() + delay
                ops = self._record_progress(entry, reply)
                self._signal_attempt(entry)
                self.node.save_soon(None if ops is None else [("set", entry_path(entry), entry), *ops])
                if reply.error_kind == "connect" and entry.get("target_agent_id") in self.node.connections \
                        and entry["kind"] in ("message", "forward"):
                    self.node.spawn(self._recover(entry["target_agent_id"]), name="peer-lookup")
                return
            self.finish(entry, "delivered" if kind == "delivered" else "failed", reply)

    async def _recover(self, agent_id: str) -> None:
        # NOTE: one peer_lookup fan-out (§6.2) at a time: each asks up to 50 connections at once, and a
        # broadcast that finds 10 peers dead used to start 10 fan-outs (490 requests) together, which held
        # the event loop for seconds (the broadcast call itself answered ~2 s late). Each waits its turn.
        async with self._recovering:
            await healing.recover(self.node, agent_id)

    def finish(self, entry: dict, state: str, reply: Reply) -> None:
        entry["state"] = state
        entry["last_status"] = reply.status
        entry["last_error"] = None if state == "delivered" else (reply.describe() if reply else None)
        if entry in self.entries:
            self.entries.remove(entry)
        try:
            ops = self.on_finished(self.node, entry, reply)
        except Exception:  # noqa: BLE001
            log.exception("outbox completion handler failed for %s", entry.get("kind"))
            ops = None
        self.node.save_soon(None if ops is None else [("del", entry_path(entry)), *ops])
        self._tried_url.pop(entry["id"], None)
        future = self._done.pop(entry["id"], None)
        if future is not None and not future.done():
            future.set_result(state)
        self._signal_attempt(entry)
        self._attempted.pop(entry["id"], None)

    def _signal_attempt(self, entry: dict) -> None:
        event = self._attempted.get(entry["id"])
        if event is not None:
            event.set()

    def _record_progress(self, entry: dict, reply: Reply) -> list | None:
        try:
            return self.on_progress(self.node, entry, reply)
        except Exception:  # noqa: BLE001
            log.exception("outbox progress handler failed for %s", entry.get("kind"))
            return None

    # --- building and sending ------------------------------------------------------------------

    async def _send(self, entry: dict) -> Reply:
        node = self.node
        kind = entry["kind"]
        payload = entry["payload"]
        if kind in ("message", "forward"):
            target = entry["target_agent_id"]
            conn = node.connections.get(target)
            if conn is None:
                return Reply(None, error="recipient is no longer a connection", error_kind="invalid")
            body = self.sign_message(conn, payload)
            self._tried_url[entry["id"]] = conn.get("agent_url")
            return await deliver(node, conn, "/__darkmatter__/message", body)
        if kind in ("response", "webhook_update"):
            url = entry["url"]
            problem = webhook_problem(url, entry["message_id"])
            if problem:
                return Reply(None, error=f"Webhook blocked: {problem}", error_kind="blocked")
            body = self.sign_update(entry["message_id"], payload)
            return await call(node, "POST", url, body=body, timeout=15.0, strict=True, max_bytes=SMALL)
        if kind == "connection_accepted":
            body = dict(payload)
            body["timestamp"] = now_iso()
            body["signature_v2_hex"] = node.sign_v2(
                "connection_accepted", body["agent_id"], body["agent_url"], body["agent_public_key_hex"],
                entry["target_agent_id"], body["timestamp"])
            return await call(node, "POST", endpoint(entry["url"], "connection_accepted"), body=body, timeout=15.0)
        return Reply(None, error=f"unknown outbox kind {kind!r}", error_kind="invalid")

    def sign_message(self, conn: dict, payload: dict) -> dict:
        """A /message body for `conn`, signed now (v1 + v2)."""
        node = self.node
        webhook = payload.get("webhook")
        if not webhook:  # our own message: the webhook base is the URL we gave this peer (§5.1)
            base = conn.get("self_url") or node.base_url
            webhook = endpoint(base, "webhook", payload["message_id"])
        ts = now_iso()
        body = {"message_id": payload["message_id"], "content": payload["content"], "webhook": webhook,
                "hops_remaining": payload["hops_remaining"], "from_agent_id": node.agent_id,
                "metadata": payload.get("metadata") or {}, "timestamp": ts,
                "from_public_key_hex": node.public_key_hex}
        body["signature_hex"] = node.sign(v1_string(node.agent_id, body["message_id"], ts, body["content"]))
        body["signature_v2_hex"] = node.sign(v2_message(
            node.agent_id, conn["agent_id"], body["message_id"], ts, body["hops_remaining"], webhook,
            body["content"], body["metadata"]))
        return body

    def sign_update(self, message_id: str, payload: dict) -> dict:
        node = self.node
        body = dict(payload)
        ts = now_iso()
        body["timestamp"] = ts
        body["from_public_key_hex"] = node.public_key_hex
        if body["type"] == "response":
            text, metadata = body["response"], body.get("metadata") or {}
            body["signature_hex"] = node.sign(v1_string(node.agent_id, message_id, ts, text))
        else:  # a receipt signs its state (§5.8), the other updates their note
            text, metadata = body.get("state") if body["type"] == "receipt" else body.get("note"), {}
        body["signature_v2_hex"] = node.sign(v2_webhook_update(
            message_id, body["type"], body["agent_id"], body.get("target_agent_id"), ts, text, metadata))
        return body


ROUTE_RACE_ATTEMPTS = 4
ROUTE_RACE_FIRST_RETRY = 0.1  # seconds; the later attempts back off as usual (about 2 and 4 s)


def not_on_route_yet(entry: dict, reply: Reply) -> bool:
    """A webhook owner answered 403 ``not_on_route`` to our update (docs/protocol.md §5.6): the forwarder's
    ``forwarded`` update naming us may still be on its way, so the first few attempts count as transient."""
    return (entry["kind"] in ("response", "webhook_update") and reply.status == 403
            and isinstance(reply.body, dict) and reply.body.get("code") == "not_on_route"
            and entry["attempts"] < ROUTE_RACE_ATTEMPTS)
