"""One node's agent spawner: a queue of inbox message ids, the caps, the running agents and their watchdogs.

Nothing on the node's request path ever waits for an agent: ``offer`` only queues an id and starts tasks.
Each agent is its own process group (``start_new_session``), so the watchdog's SIGTERM/SIGKILL reach the
MCP servers the agent started too.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from darkmatter.api import SESSION_ENV, grant_session_scope, revoke_session_scope

from darkmatter_autospawn import prompt
from darkmatter_autospawn.settings import MCP_SERVER_NAME, SPAWNED_MARKER, Settings

log = logging.getLogger("darkmatter_autospawn")

HISTORY = 20
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class Agent:
    message_id: str
    sender: str
    started: float = field(default_factory=time.monotonic)
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    task: asyncio.Task | None = None
    timed_out: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Spawner:
    def __init__(self, node: Any, settings: Settings):
        self.node = node
        self.settings = settings
        self.queue: collections.deque[str] = collections.deque()
        self.running: dict[str, Agent] = {}
        self.spawn_times: collections.deque[float] = collections.deque()
        self.spawn_log: collections.deque[tuple[float, str, bool]] = collections.deque()  # (when, sender, stranger)
        self.history: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self.closing = False
        self._timer: asyncio.TimerHandle | None = None

    # --- intake -------------------------------------------------------------------------------

    def eligible(self, message: dict) -> str | None:
        """Why ``message`` must not spawn an agent, or None."""
        if self.settings.allow_unverified:
            return None
        if not message.get("verified"):
            return "unverified sender (set DARKMATTER_AGENT_ALLOW_UNVERIFIED=true to allow)"
        if message.get("from_agent_id") not in self.node.connections:
            return "the sender is not a connection"
        return None

    def over_quota(self, sender: str) -> str | None:
        """Why ``sender`` may not start another agent in this window, or None: one sender may use at most
        DARKMATTER_AGENT_MAX_PER_SENDER spawns, and connections the owner never approved (auto-accepted by a
        genesis node) together at most DARKMATTER_AGENT_MAX_FROM_STRANGERS, so a stranger who became a
        connection cannot spend the owner's whole budget."""
        s = self.settings
        self._spawns_in_window()
        if sum(1 for _, who, _ in self.spawn_log if who == sender) >= s.max_per_sender:
            return f"this sender already started {s.max_per_sender} agent(s) in the window"
        if self._stranger(sender) and sum(1 for _, _, stranger in self.spawn_log if stranger) >= s.max_from_strangers:
            return (f"auto-accepted connections already started {s.max_from_strangers} agent(s) in the window "
                    "(accept the peer yourself, or raise DARKMATTER_AGENT_MAX_FROM_STRANGERS)")
        return None

    def _stranger(self, sender: str) -> bool:
        conn = self.node.connections.get(sender)
        return conn is None or bool(conn.get("auto_accepted"))

    def offer(self, message: dict) -> None:
        """A message was accepted into the inbox: queue it if it may spawn an agent, and pump."""
        if self.closing:
            return
        message_id = message.get("message_id")
        if not isinstance(message_id, str):
            return
        refusal = self.eligible(message)
        if refusal is not None:
            log.info("autospawn: not spawning for %s: %s", message_id, refusal)
            return
        if message_id in self.running or message_id in self.queue:
            return
        if len(self.queue) >= self.node.config.inbox_max:
            self.waiting()  # drop ids that left the inbox while they waited
        self.queue.append(message_id)
        self.pump()

    def _inbox(self) -> dict[str, dict]:
        return {m.get("message_id"): m for m in self.node.state.get("inbox", [])}

    def waiting(self) -> list[str]:
        """Queued ids still in the inbox (answered or removed ones are dropped)."""
        inbox = self._inbox()
        kept = [mid for mid in self.queue if mid in inbox]
        if len(kept) != len(self.queue):
            self.queue = collections.deque(kept)
        return kept

    # --- caps ---------------------------------------------------------------------------------

    def _spawns_in_window(self) -> int:
        horizon = time.monotonic() - self.settings.window
        while self.spawn_times and self.spawn_times[0] <= horizon:
            self.spawn_times.popleft()
        while self.spawn_log and self.spawn_log[0][0] <= horizon:
            self.spawn_log.popleft()
        return len(self.spawn_times)

    def next_slot_in(self) -> float:
        """Seconds until the rolling window has room again (0 if it has now)."""
        if self._spawns_in_window() < self.settings.max_per_hour:
            return 0.0
        return max(0.0, self.spawn_times[0] + self.settings.window - time.monotonic())

    def _arm_timer(self, delay: float | None = None) -> None:
        if self._timer is not None or self.closing:
            return
        delay = (self.next_slot_in() if delay is None else delay) + 0.05

        def fire() -> None:
            self._timer = None
            self.pump()

        self._timer = asyncio.get_running_loop().call_later(delay, fire)

    def pump(self) -> None:
        """Start agents for queued messages while both caps allow."""
        if self.closing:
            return
        inbox = self._inbox()
        held: list[str] = []  # senders over their quota: their messages wait, in order, for the window to move
        while self.queue and len(self.running) < self.settings.max_concurrent:
            if self._spawns_in_window() >= self.settings.max_per_hour:
                self._arm_timer()
                break
            message_id = self.queue.popleft()
            message = inbox.get(message_id)
            if message is None or message_id in self.running:
                continue  # answered, forwarded away or removed while it waited
            refusal = self.eligible(message)
            if refusal is not None:
                log.info("autospawn: dropping %s from the queue: %s", message_id, refusal)
                continue
            sender = str(message.get("from_agent_id"))
            quota = self.over_quota(sender)
            if quota is not None:
                log.info("autospawn: %s waits: %s", message_id, quota)
                held.append(message_id)
                continue
            self.spawn_times.append(time.monotonic())
            self.spawn_log.append((time.monotonic(), sender, self._stranger(sender)))
            agent = Agent(message_id=message_id, sender=sender)
            self.running[message_id] = agent
            agent.task = asyncio.get_running_loop().create_task(
                self._run(agent, message), name=f"autospawn-{message_id}")
        if held:
            self.queue.extendleft(reversed(held))
            if self.spawn_log:
                self._arm_timer(max(0.0, self.spawn_log[0][0] + self.settings.window - time.monotonic()))
        self.node.changed()

    # --- one agent ----------------------------------------------------------------------------

    def environment(self, message_id: str, token: str = "") -> dict[str, str]:
        """The agent's environment: ours, the node's DARKMATTER_* settings, and what reaches this node."""
        env = dict(os.environ)
        env.update({k: v for k, v in self.node.config.env.items() if k.startswith("DARKMATTER_")})
        env.update(self.node_env(token))
        env[SPAWNED_MARKER] = message_id
        return env

    def node_env(self, token: str = "") -> dict[str, str]:
        """What a `darkmatter run` started by the agent needs to attach to this node (docs/protocol.md §12.4),
        with the session token that scopes it to its message (§12.6)."""
        env = {
            "DARKMATTER_AGENT_ENABLED": "false",  # the recursion guard
            "DARKMATTER_STATE_FILE": str(Path(self.node.config.state_file).expanduser().absolute()),
            "DARKMATTER_PORT": str(self.node.port),
            "DARKMATTER_TRANSPORT": "stdio",
            "DARKMATTER_MCP_URL": f"http://127.0.0.1:{self.node.port}/mcp",
        }
        if token:
            env[SESSION_ENV] = token
        return env

    def mcp_config(self, token: str = "") -> str:
        """``--mcp-config`` JSON naming one stdio server: this node, through the parallel-session relay."""
        server = {"type": "stdio", "command": sys.executable,
                  "args": ["-m", "darkmatter", "run", "--transport", "stdio"], "env": self.node_env(token)}
        return json.dumps({"mcpServers": {MCP_SERVER_NAME: server}})

    def argv(self, message: dict, token: str = "") -> list[str]:
        s = self.settings
        text = prompt.build(self.node, message, content_max=s.content_max)
        argv = [*s.command, "-p", text, *s.args]
        if s.mcp_config:
            argv += ["--mcp-config", self.mcp_config(token), "--strict-mcp-config"]
        return argv

    def _open_log(self, agent: Agent) -> IO[bytes]:
        """Create the per-spawn log (and prune old ones). Runs in a worker thread."""
        s = self.settings
        assert s.log_dir is not None
        s.log_dir.mkdir(parents=True, exist_ok=True)
        stem = Path(self.node.config.state_file).stem
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        name = f"{stem}-agent-{stamp}-{_UNSAFE.sub('_', agent.message_id)[:48]}.log"
        old = sorted(s.log_dir.glob(f"{stem}-agent-*.log"))
        for path in old[: max(0, len(old) - s.log_keep + 1)]:
            try:
                path.unlink()
            except OSError:
                pass
        agent.log_path = s.log_dir / name
        handle = _open_private_log(agent.log_path)
        header = (f"# darkmatter autospawn: message {agent.message_id} from {agent.sender}\n"
                  f"# started {datetime.now(timezone.utc).isoformat()} command {s.command[0]} "
                  f"cwd {s.cwd} timeout {s.timeout:g}s\n")
        handle.write(header.encode())
        handle.flush()
        return handle

    def _close_log(self, agent: Agent, outcome: str) -> None:
        if agent.log_path is None:
            return
        try:
            with _open_private_log(agent.log_path) as handle:
                handle.write(f"\n# {outcome} at {datetime.now(timezone.utc).isoformat()}\n".encode())
        except OSError as exc:
            log.warning("autospawn: cannot finish log %s: %s", agent.log_path, exc)

    def _signal(self, agent: Agent, sig: int) -> None:
        if agent.process is None:
            return
        try:
            os.killpg(agent.process.pid, sig)  # the agent's own process group (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    async def _stop(self, agent: Agent) -> int | None:
        """SIGTERM the agent's process group; SIGKILL it after the grace period."""
        proc = agent.process
        if proc is None:
            return None
        self._signal(agent, signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), self.settings.kill_grace)
        except asyncio.TimeoutError:
            log.warning("autospawn: agent %s for %s ignored SIGTERM; killing it", proc.pid, agent.message_id)
            self._signal(agent, signal.SIGKILL)
            return await proc.wait()

    async def _run(self, agent: Agent, message: dict) -> None:
        s = self.settings
        outcome = "failed to start"
        token = grant_session_scope(self.node, agent.message_id)  # the node limits the agent to its message
        try:
            handle = await asyncio.to_thread(self._open_log, agent)
            try:
                agent.process = await asyncio.create_subprocess_exec(
                    *self.argv(message, token), stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                    cwd=str(s.cwd), env=self.environment(agent.message_id, token), start_new_session=True)
            finally:
                handle.close()  # the child holds its own copy of the descriptor
            log.info("autospawn: started agent pid %s for message %s (log %s)", agent.pid, agent.message_id,
                     agent.log_path)
            self.node.changed()
            try:
                code = await asyncio.wait_for(agent.process.wait(), s.timeout)
                outcome = f"exited with code {code}"
            except asyncio.TimeoutError:
                agent.timed_out = True
                log.warning("autospawn: agent %s for %s timed out after %gs; stopping it", agent.pid,
                            agent.message_id, s.timeout)
                code = await self._stop(agent)
                outcome = f"timed out after {s.timeout:g}s and was stopped (code {code})"
            # Leftovers of the agent (an MCP server it did not close) go with it.
            self._signal(agent, signal.SIGTERM)
        except asyncio.CancelledError:
            if agent.process is not None and agent.process.returncode is None:
                self._signal(agent, signal.SIGKILL)
            outcome = "cancelled at shutdown"
            raise
        except OSError as exc:
            log.error("autospawn: cannot start %s for message %s: %s", s.command[0], agent.message_id, exc)
            outcome = f"failed to start: {exc}"
        except Exception:  # noqa: BLE001 - one agent's failure never takes the node down
            log.exception("autospawn: agent for %s failed", agent.message_id)
            outcome = "failed"
        finally:
            revoke_session_scope(self.node, token)
            self.running.pop(agent.message_id, None)
            entry = self._inbox().get(agent.message_id)
            answered = entry is None
            forwarded = bool(entry and entry.get("forwarded_to"))
            record = {"message_id": agent.message_id, "outcome": outcome, "answered": answered,
                      "forwarded": forwarded,
                      "timed_out": agent.timed_out, "seconds": round(time.monotonic() - agent.started, 1),
                      "log": str(agent.log_path) if agent.log_path else None, "pid": agent.pid}
            self.history.append(record)
            if agent.log_path is not None:
                try:
                    await asyncio.shield(asyncio.to_thread(self._close_log, agent, outcome))
                except asyncio.CancelledError:
                    pass
            log.info("autospawn: agent for %s %s%s", agent.message_id, outcome,
                     "" if answered else "; it forwarded the message" if forwarded else
                     "; the message is still in the inbox, unanswered")
            if not self.closing:
                self.pump()

    # --- shutdown and status ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop every running agent: SIGTERM, SIGKILL after the grace period."""
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        agents = list(self.running.values())
        for agent in agents:
            self._signal(agent, signal.SIGTERM)
        tasks = [a.task for a in agents if a.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.settings.kill_grace)
        if pending:
            for agent in agents:
                if agent.task in pending:
                    self._signal(agent, signal.SIGKILL)
            _, pending = await asyncio.wait(pending, timeout=5.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)

    def status_lines(self) -> list[str]:
        s = self.settings
        running = list(self.running.values())
        waiting = self.waiting()
        used = self._spawns_in_window()
        line = (f"Autospawn: {len(running)} agent(s) running (cap {s.max_concurrent}), "
                f"{len(waiting)} message(s) waiting, {used}/{s.max_per_hour} spawns in the last "
                f"{_duration(s.window)}")
        if waiting and len(running) < s.max_concurrent and used >= s.max_per_hour:
            line += f"; hourly cap reached, next start in {_duration(self.next_slot_in())}"
        lines = [line + "."]
        now = time.monotonic()
        for agent in running[:5]:
            lines.append(f"Autospawn: agent pid {agent.pid} on message {prompt.quoted(agent.message_id, 64)} "
                         f"for {int(now - agent.started)}s (timeout {s.timeout:g}s).")
        if self.history and not (self.history[-1]["answered"] or self.history[-1]["forwarded"]):
            last = self.history[-1]
            lines.append(f"Autospawn: the last agent (message {prompt.quoted(last['message_id'], 64)}) "
                         f"{last['outcome']} without answering; log {last['log']}.")
        return lines


def _open_private_log(path: Path) -> IO[bytes]:
    """A per-spawn log for appending: 0600 (it holds peer content and the agent's output), never through a
    symlink planted at its path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds >= 120:
        return f"{seconds // 60} min"
    return f"{seconds} s"
