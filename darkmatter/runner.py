"""``darkmatter run``: start the node and serve MCP (docs/protocol.md §12.1, §12.4).

* **http**: the node serves the mesh and ``/mcp`` on its port until SIGINT/SIGTERM.
* **stdio** (``auto`` when stdin is not a terminal): the same process and event loop also serve one MCP
  session over stdio. When stdin closes, the node keeps serving while HTTP MCP sessions remain and exits
  ``DARKMATTER_STDIO_LINGER_SECONDS`` (default 10) after the last one, flushing its state first.
* If another process already runs this agent (the state lock is held), a stdio process checks that the
  lock's port answers as that agent and **relays** MCP to it instead of loading the state. When that process
  ends, the relay takes the node over (or relays to whoever did) and its client's session goes on.
* If the configured port is taken by a different agent (or any other program), the node takes the next free
  port of ``DARKMATTER_DISCOVERY_PORTS``; the state file, and so the identity, stay the same.

Start-up errors print one line on stderr and give a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from pathlib import Path

from darkmatter import banner
from darkmatter.config import Config, ConfigError
from darkmatter.node import Node, StartupError
from darkmatter.plugins import PluginError
from darkmatter.state import StateError, StateLock, StateLocked, read_lock_info

log = logging.getLogger(__name__)

LINGER_DEFAULT = 10.0
OWNER_WAIT = 10.0  # how long a second process waits for the lock holder's HTTP port to answer
# In stdio mode HTTP starts answering once the stdio session has written its second message (the answers to
# initialize and, from every client we know, tools/list), or HTTP_AFTER_FIRST_ANSWER s after its first, or
# HTTP_AFTER_AT_MOST s after the session began, whichever is first (see _open_http_gate): the HTTP server's
# start-up (hypercorn's import, mostly) stays off the MCP cold start. The port is bound and listening from the
# start, so a peer connecting meanwhile waits in the backlog.
HTTP_AFTER_FIRST_ANSWER = 0.5
HTTP_AFTER_AT_MOST = 5.0


def choose_transport(config: Config) -> str:
    if config.transport != "auto":
        return config.transport
    try:
        return "http" if sys.stdin is None or sys.stdin.isatty() else "stdio"
    except (ValueError, OSError):  # stdin closed
        return "http"


async def run(config: Config) -> int:
    """Run ``darkmatter run`` with ``config``; returns the process exit code."""
    try:
        if choose_transport(config) == "stdio":
            return await _run_stdio(config)
        return await _run_http(config)
    except (ConfigError, PluginError) as exc:
        _fail(str(exc))
        return 2
    except (StartupError, StateError) as exc:
        _fail(str(exc))
        return 1


def _fail(message: str) -> None:
    # NOTE: stderr, never stdout (it carries MCP in stdio mode); one line, no traceback.
    sys.stderr.write(f"darkmatter: error: {' '.join(message.split())}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _signals(stop: asyncio.Event):
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# --- ports -----------------------------------------------------------------------------------------


def port_in_use(host: str, port: int) -> bool:
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def next_free_port(config: Config, taken: int) -> int | None:
    """The next free port of the discovery range after ``taken``, wrapping around."""
    ports = sorted(p for p in config.discovery_ports if p != taken)
    for port in [p for p in ports if p > taken] + [p for p in ports if p < taken]:
        if not port_in_use(config.host, port):
            return port
    return None


async def start_node(config: Config, serve_after: asyncio.Event | None = None) -> Node:
    """Start a node for ``config``, moving to a free port when the configured one is taken.

    ``serve_after``: see ``lifecycle.start``. Raises ``StateLocked`` when another process runs this agent."""
    node = Node(config)
    try:
        await node.start(serve_after=serve_after)
        return node
    except StartupError:
        taken = config.port
        if not taken or not port_in_use(config.host, taken):
            raise
    # We hold no lock now, but we did get it: whoever has the port is not this agent.
    port = next_free_port(config, taken)
    if port is None:
        raise StartupError(f"Port {taken} is in use by another program or agent, and no port of "
                           f"DARKMATTER_DISCOVERY_PORTS is free. Set DARKMATTER_PORT to a free port.")
    log.warning("port %d is taken by another program or agent; serving this agent on port %d instead "
                "(same state file, same identity)", taken, port)
    config.port = port
    node = Node(config, pm=node.pm)
    await node.start(serve_after=serve_after)
    return node


# --- http mode ----------------------------------------------------------------------------------------


async def _run_http(config: Config) -> int:
    stop = asyncio.Event()
    with _signals(stop):  # installed before the port serves: a SIGTERM during start-up still stops cleanly
        try:
            node = await start_node(config)
        except StateLocked as exc:
            raise StartupError(_locked_message(exc)) from None
        log.info("agent %s serving %s (MCP at %s/mcp)", node.agent_id[:12], node.base_url,
                 f"http://127.0.0.1:{node.port}")
        banner.show(node)
        try:
            await stop.wait()
        finally:
            await node.stop()
    return 0


def _locked_message(exc: StateLocked) -> str:
    info = exc.info or {}
    agent = str(info.get("agent_id") or "?")[:12]
    where = f" on port {info['port']}" if info.get("port") else ""
    pid = f" (pid {info['pid']})" if info.get("pid") else ""
    return (f"agent {agent} is already running{where}{pid}: its state file is locked ({exc.path}). Stop it "
            f"first, connect to it over MCP, or use another DARKMATTER_STATE_FILE.")


# --- stdio mode ---------------------------------------------------------------------------------------


async def _run_stdio(config: Config) -> int:
    from darkmatter.stdio import StdioPipes  # NOTE: the relay (and its HTTP client) only when it is needed
    if sys.stdin is None or sys.stdout is None:  # fd 0 or 1 was closed when the process started
        raise StartupError("stdio mode needs an open stdin and stdout; use --transport http to run without them")
    try:
        pipes = await StdioPipes().open()
    except OSError as exc:
        raise StartupError(f"stdio mode needs an open stdin and stdout ({exc.strerror}); use "
                           f"--transport http to run without them") from None
    stop = asyncio.Event()
    try:
        with _signals(stop):
            handover = None
            released = 0
            session_token = (config.env.get("DARKMATTER_SESSION_TOKEN") or "").strip() or None
            while True:
                try:
                    if session_token:
                        # §12.6: a session scoped to one message only ever relays to the running node; it
                        # never loads the state itself (that would make it a full local session).
                        StateLock(Path(config.state_file)).acquire_or_raise_locked()
                        raise StartupError("this MCP session is scoped to one message (DARKMATTER_SESSION_TOKEN) "
                                           "and the node it belongs to is not running")
                    http_gate = asyncio.Event()
                    node = await start_node(config, serve_after=http_gate)
                except StateLocked as exc:
                    info = await wait_for_owner(exc)
                    if info is None:
                        released += 1
                        if released > 5:
                            break
                        continue  # the lock was released meanwhile: try to own the node again
                    released = 0
                    # NOTE: a relay makes one HTTP request per MCP message; keep httpx's per-request
                    # INFO lines out of the MCP client's server log.
                    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
                    log.info("agent %s already runs on port %s (pid %s); relaying MCP to it",
                             str(info.get("agent_id"))[:12], info["port"], info.get("pid"))
                    from darkmatter.relay import Relay

                    relay = Relay(pipes, int(info["port"]), handover, session_token)
                    handover = await _until_stopped(relay.run(), stop)
                    if handover is None or stop.is_set() or session_token:
                        return 0
                    log.warning("the process serving agent %s went away; taking over its node",
                                str(info.get("agent_id"))[:12])
                    continue
                if handover is None:
                    banner.show(node)  # stderr, and only on a terminal: stdout carries MCP here
                if handover is not None:
                    from darkmatter.relay import ReplayPipes

                    source = ReplayPipes(pipes, handover)
                else:
                    source = pipes
                node.spawn(_open_http_gate(http_gate, pipes), name="http-gate")
                return await _serve_stdio(node, source, stop)
            raise StartupError("the state file keeps being locked and released by other processes; stop them "
                               "or use another DARKMATTER_STATE_FILE")
    finally:
        await pipes.close()


async def _until_stopped(coro, stop: asyncio.Event):
    """The result of ``coro``, or None once SIGINT/SIGTERM arrived (or it failed)."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
    result = (await asyncio.gather(task, return_exceptions=True))[0]
    if isinstance(result, BaseException):
        if not isinstance(result, asyncio.CancelledError):
            log.warning("relay ended: %s", result)
        return None
    return result


async def _open_http_gate(gate: asyncio.Event, pipes) -> None:
    """Set ``gate`` (HTTP may start) once the session has written its second message, at most
    HTTP_AFTER_FIRST_ANSWER s after its first and HTTP_AFTER_AT_MOST s from now."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(pipes.when_written(1).wait(), HTTP_AFTER_AT_MOST)
        await asyncio.wait_for(pipes.when_written(2).wait(), HTTP_AFTER_FIRST_ANSWER)
    gate.set()


async def _serve_stdio(node: Node, pipes, stop: asyncio.Event) -> int:
    linger = node.config.get_float("DARKMATTER_STDIO_LINGER_SECONDS", LINGER_DEFAULT)
    try:
        serving = asyncio.ensure_future(node.mcp.serve_stdio(pipes, pipes))
        stopper = asyncio.ensure_future(stop.wait())
        http = node.server_task
        await asyncio.wait({serving, stopper} | ({http} if http else set()), return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if http is not None and http.done() and not serving.done():
            # HTTP starts after the stdio session's first answers (HTTP_AFTER_*): its failure shows here
            failure = None if http.cancelled() else http.exception()
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            raise StartupError(f"the HTTP server stopped: {failure or 'it ended unexpectedly'}")
        if serving.done():
            if not serving.cancelled() and serving.exception() is not None:
                log.warning("stdio session ended: %s", serving.exception())
            await _linger(node, stop, linger)
        else:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
    finally:
        await node.stop()
    return 0


async def _linger(node: Node, stop: asyncio.Event, linger: float) -> None:
    """§12.4: after stdin EOF keep serving while HTTP MCP sessions exist; exit ``linger`` s after the last."""
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    if node.mcp.http_sessions():
        log.info("stdin closed; the node keeps serving %d other MCP session(s)", node.mcp.http_sessions())
    while not stop.is_set():
        if node.mcp.http_sessions():
            idle_since = loop.time()
        elif loop.time() - idle_since >= linger:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def wait_for_owner(exc: StateLocked) -> dict | None:
    """Wait (bounded) until the lock holder answers as its agent on its port; None if it went away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OWNER_WAIT
    info = exc.info or {}
    import httpx  # NOTE: only a second process for the same agent needs an HTTP client; keep it off start-up

    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
        while loop.time() < deadline:
            if info.get("port"):
                verdict = await owner_answers(http, int(info["port"]), info.get("agent_id"))
                if verdict is True:
                    return info
                if verdict is False:
                    raise StartupError(
                        f"the state file {exc.path} is locked by pid {info.get('pid')}, but port {info['port']} "
                        f"answers as a different agent; stop that process or use another DARKMATTER_STATE_FILE")
            await asyncio.sleep(0.2)
            info = read_lock_info(exc.path) or info
            if not _lock_held(exc):
                return None
    raise StartupError(f"the state file {exc.path} is locked by pid {info.get('pid')}, but nothing answers on "
                       f"port {info.get('port')}; stop that process or use another DARKMATTER_STATE_FILE")


def _lock_held(exc: StateLocked) -> bool:
    import fcntl
    import os

    try:
        fd = os.open(exc.path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


async def owner_answers(http, port: int, agent_id: str | None) -> bool | None:
    """True: the port serves ``agent_id``; False: it serves another agent; None: no answer (yet). ``http`` is an
    ``httpx.AsyncClient``."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    for path in ("/.well-known/darkmatter.json", "/__darkmatter__/status"):
        try:
            reply = await http.get(base + path)
        except httpx.HTTPError:
            return None
        if reply.status_code == 404:
            continue
        try:
            doc = reply.json()
        except ValueError:
            return None
        if reply.status_code == 200 and isinstance(doc, dict) and doc.get("agent_id"):
            return agent_id is None or doc["agent_id"] == agent_id
        return None
    # Neither document is served (no http_transport plugin): accept a reachable MCP endpoint.
    try:
        reply = await http.get(base + "/mcp", headers={"Accept": "text/event-stream"})
    except httpx.HTTPError:
        return None
    return True if reply.status_code in (400, 405, 406) else None


def main() -> None:  # pragma: no cover - `python -m darkmatter.runner`, for when the CLI is not installed
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = Config.from_env()
    except ConfigError as exc:
        _fail(str(exc))
        sys.exit(2)
    sys.exit(asyncio.run(run(config)))


if __name__ == "__main__":  # pragma: no cover
    main()
