"""``darkmatter run`` over stdio (docs/protocol.md §12.1, §12.4), driven by the official Python SDK stdio client.

Each test launches real ``python -m darkmatter run`` processes. Like MCP clients, the SDK does not pass the
parent environment, so every DARKMATTER_* variable is given explicitly (``env_for_tests``: discovery, UPnP
and IP lookup off, an isolated HOME).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from darkmatter.mesh import outbound as actions
from darkmatter.state import read_lock_info
from darkmatter.testing import env_for_tests, node_context

pytestmark = pytest.mark.anyio

RUN = [sys.executable, "-m", "darkmatter", "run"]


def node_env(home: Path, state_file: Path, **extra: str) -> dict[str, str]:
    env = env_for_tests(home, DARKMATTER_TRANSPORT="stdio", DARKMATTER_PORT="0",
                        DARKMATTER_STATE_FILE=str(state_file), DARKMATTER_PLUGINS="http_transport",
                        DARKMATTER_STDIO_LINGER_SECONDS="0", DARKMATTER_LOG_LEVEL="warning")
    env.update(extra)
    return env


def stdio_client(home: Path, state_file: Path, *, mode: str = "legacy", on_message=None, **extra: str) -> Client:
    params = StdioServerParameters(command=RUN[0], args=RUN[1:], env=node_env(home, state_file, **extra))
    return Client(params, mode=mode, message_handler=on_message, read_timeout_seconds=60)


async def call(session: Client, name: str, **args) -> dict:
    result = await session.call_tool(name, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


def list_changed_counter():
    seen: list[float] = []

    async def on_message(message) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            seen.append(time.monotonic())

    return seen, on_message


async def wait_until(predicate, timeout: float = 10.0, step: float = 0.05):
    with anyio.fail_after(timeout):
        while not (value := predicate()):
            await anyio.sleep(step)
    return value


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("mode,version", [("legacy", "2025-11-25"), ("auto", "2026-07-28")])
async def test_stdio_tools_and_list_changed_after_a_mesh_message(tmp_path, mode, version):
    seen, on_message = list_changed_counter()
    async with stdio_client(tmp_path / "x", tmp_path / "x" / "state.json", mode=mode, on_message=on_message) as c:
        assert c.protocol_version == version
        assert c.server_capabilities.tools.list_changed is True
        names = {t.name for t in (await c.list_tools()).tools}
        assert {"darkmatter_status", "darkmatter_send_message", "darkmatter_authenticate"} <= names
        me = await call(c, "darkmatter_get_identity")
        key = await call(c, "darkmatter_authenticate")
        assert "private_key_hex" not in key and key["agent_id"] == me["agent_id"]  # never in a result (§12.3)
        assert key["identity_backup"].endswith(".identity-backup.json")
        async with node_context(tmp_path / "peer") as peer:
            await actions.request_connection(peer, me["url"])
            # the notification arrives (a generous bound; its latency is a bench figure: bench --only responsive)
            if mode == "legacy":
                await wait_until(lambda: seen)  # connecting changed the status too
                seen.clear()
                await actions.send_message(peer, "Ping over the mesh", target_agent_id=me["agent_id"])
                await wait_until(lambda: seen, timeout=30)
            else:
                async with c.listen(tools_list_changed=True) as sub:
                    await actions.send_message(peer, "Ping over the mesh", target_agent_id=me["agent_id"])
                    with anyio.fail_after(30):
                        event = await sub.__anext__()
                    assert type(event).__name__ == "ToolsListChanged"
            status = next(t for t in (await c.list_tools()).tools if t.name == "darkmatter_status")
            assert "1 inbox message" in status.description and "ACTION:" in status.description
            inbox = await call(c, "darkmatter_list_inbox")
            assert "Ping over the mesh" in json.dumps(inbox)


async def test_two_stdio_processes_for_one_agent_share_one_node(tmp_path):
    state = tmp_path / "agent" / "state.json"
    seen_a, on_a = list_changed_counter()
    seen_b, on_b = list_changed_counter()
    async with stdio_client(tmp_path / "agent", state, on_message=on_a) as a:
        me = await call(a, "darkmatter_get_identity")
        async with stdio_client(tmp_path / "agent", state, on_message=on_b) as b, \
                stdio_client(tmp_path / "agent", state, mode="auto") as modern:
            assert (await call(b, "darkmatter_get_identity"))["agent_id"] == me["agent_id"]
            assert (await call(modern, "darkmatter_get_identity"))["port"] == me["port"]
            lock = read_lock_info(state.with_name("state.json.lock"))
            assert lock["agent_id"] == me["agent_id"] and lock["port"] == me["port"]

            await call(b, "darkmatter_update_bio", bio="Written through the relay.")
            assert (await call(a, "darkmatter_get_identity"))["bio"] == "Written through the relay."
            async with node_context(tmp_path / "peer") as peer:
                await actions.request_connection(peer, me["url"])
                await actions.send_message(peer, "One inbox for all", target_agent_id=me["agent_id"])
                inbox_a = await call(a, "darkmatter_list_inbox")
                inbox_b = await call(b, "darkmatter_list_inbox")
                inbox_m = await call(modern, "darkmatter_list_inbox")
                assert "One inbox for all" in json.dumps(inbox_a)
                assert inbox_a == inbox_b == inbox_m
                await wait_until(lambda: seen_a and seen_b, timeout=30)  # notifications cross the relay
            # The relay is a loopback HTTP session on the owner.
            assert (await call(a, "darkmatter_status"))["mcp_sessions"]["http"] >= 1


async def test_port_of_another_agent_moves_us_to_a_free_port_with_the_same_identity(tmp_path):
    taken, spare = free_ports(2)
    state = tmp_path / "mine" / "state.json"
    async with node_context(tmp_path / "other", port=taken) as other:
        extra = {"DARKMATTER_PORT": str(taken), "DARKMATTER_DISCOVERY_PORTS": f"{taken},{spare}"}
        async with stdio_client(tmp_path / "mine", state, **extra) as c:
            me = await call(c, "darkmatter_get_identity")
            assert me["port"] == spare and me["agent_id"] != other.agent_id
        assert json.loads(state.read_text())["agent_id"] == me["agent_id"]
        async with stdio_client(tmp_path / "mine", state, **extra) as c:
            again = await call(c, "darkmatter_get_identity")
            assert again["agent_id"] == me["agent_id"] and again["port"] == spare


async def test_owner_keeps_serving_http_sessions_after_stdin_closes(tmp_path):
    state = tmp_path / "state.json"
    env = node_env(tmp_path, state, DARKMATTER_STDIO_LINGER_SECONDS="1")
    proc = await anyio.open_process(RUN, env={**env, "PATH": os.environ.get("PATH", "")},
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lock = state.with_name("state.json.lock")
        port = await wait_until(lambda: read_lock_info(lock).get("port"))
        http = httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30.0, read=60.0))
        async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http),
                          mode="legacy") as c:
            await proc.stdin.aclose()  # the stdio client went away
            await anyio.sleep(2.0)
            assert proc.returncode is None, "the owner must keep serving its other MCP session"
            await call(c, "darkmatter_update_bio", bio="Set after stdin closed.")
        with anyio.fail_after(8):
            code = await proc.wait()
        assert code == 0
        assert json.loads(state.read_text())["bio"] == "Set after stdin closed."
        assert not read_lock_info(lock)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_http_starts_after_the_stdio_session_answers_and_an_early_peer_waits_for_it(tmp_path):
    """In stdio mode HTTP starts once the session has answered initialize and tools/list (the HTTP server's
    start-up stays off the MCP client's cold start). The port is listening from the start: a request that
    arrives before is not refused, it is answered once the session has answered."""
    state = tmp_path / "state.json"
    env = {**node_env(tmp_path, state), "PATH": os.environ.get("PATH", "")}
    proc = await anyio.open_process(RUN, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
    lines = b""

    async def answer() -> dict:
        nonlocal lines
        with anyio.fail_after(60):
            while b"\n" not in lines:
                lines += await proc.stdout.receive()
        line, _, lines = lines.partition(b"\n")
        return json.loads(line)

    try:
        port = await wait_until(lambda: read_lock_info(state.with_name("state.json.lock")).get("port"))
        early = await anyio.connect_tcp("127.0.0.1", port)  # accepted by the kernel's listen backlog
        await early.send(b"GET /__darkmatter__/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        with anyio.move_on_after(0.5) as waited:
            await early.receive()
        assert waited.cancelled_caught, "HTTP answered before the stdio session had answered anything"
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        await proc.stdin.send(json.dumps(init).encode() + b"\n")
        assert (await answer())["id"] == 1
        await proc.stdin.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n'
                              b'{"jsonrpc": "2.0", "id": 2, "method": "tools/list"}\n')
        tools = await answer()
        assert tools["id"] == 2 and any(t["name"] == "darkmatter_status" for t in tools["result"]["tools"])
        reply = b""
        with anyio.fail_after(30):
            try:
                while True:
                    reply += await early.receive()
            except anyio.EndOfStream:
                pass
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply[:300]
        me = json.loads(body)
        assert me["agent_id"] == json.loads(state.read_text())["agent_id"]
        await proc.stdin.aclose()
        with anyio.fail_after(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_http_starts_without_a_stdio_client_that_says_anything(tmp_path):
    """A stdio node whose client never writes still serves HTTP (after HTTP_AFTER_AT_MOST seconds)."""
    state = tmp_path / "state.json"
    env = {**node_env(tmp_path, state), "PATH": os.environ.get("PATH", "")}
    proc = await anyio.open_process(RUN, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
    try:
        port = await wait_until(lambda: read_lock_info(state.with_name("state.json.lock")).get("port"))
        async with httpx2.AsyncClient(trust_env=False, timeout=30) as http:
            reply = await http.get(f"http://127.0.0.1:{port}/.well-known/darkmatter.json")
        assert reply.status_code == 200 and reply.json()["agent_id"]
    finally:
        proc.kill()
        await proc.wait()


async def _run_once(env: dict, *, stdin: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**env, "PATH": os.environ.get("PATH", "")}
    with anyio.fail_after(timeout):
        return await anyio.run_process(RUN, input=stdin, env=env, check=False)


async def test_startup_errors_are_one_clear_line(tmp_path):
    state = tmp_path / "state.json"
    state.write_text("{not json")
    result = await _run_once(node_env(tmp_path, state))
    err = result.stderr.decode()
    assert result.returncode == 1 and result.stdout == b""
    assert "darkmatter: error:" in err and "Traceback" not in err and "DARKMATTER_STATE_RECOVERY" in err

    bad = await _run_once(node_env(tmp_path, tmp_path / "ok.json", DARKMATTER_INBOX_MAX="many"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr.decode()
    assert "DARKMATTER_INBOX_MAX" in bad.stderr.decode()


async def test_http_mode_refuses_a_second_process_for_the_same_agent(tmp_path):
    state = tmp_path / "agent" / "state.json"
    async with stdio_client(tmp_path / "agent", state) as c:
        me = await call(c, "darkmatter_get_identity")
        result = await _run_once(node_env(tmp_path / "agent", state, DARKMATTER_TRANSPORT="http"))
        err = result.stderr.decode()
        assert result.returncode == 1 and "Traceback" not in err
        assert "already running" in err and me["agent_id"][:12] in err


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_sigterm_stops_the_node_cleanly_and_flushes_state(tmp_path, transport):
    """HTTP mode serves until SIGTERM; a stdio node stops on SIGTERM even while its stdin stays open."""
    state = tmp_path / "state.json"
    env = {**node_env(tmp_path, state, DARKMATTER_TRANSPORT=transport), "PATH": os.environ.get("PATH", "")}
    proc = await anyio.open_process(RUN, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
    try:
        lock = state.with_name("state.json.lock")
        port = await wait_until(lambda: read_lock_info(lock).get("port"))
        http = httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30.0, read=60.0))
        async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http),
                          mode="legacy") as c:
            await call(c, "darkmatter_update_bio", bio=f"Set over HTTP in {transport} mode.")
        proc.terminate()
        with anyio.fail_after(8):
            code = await proc.wait()
        assert code == 0
        assert json.loads(state.read_text())["bio"] == f"Set over HTTP in {transport} mode."
        assert not read_lock_info(lock)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_relays_take_over_when_the_owning_process_ends(tmp_path):
    """MCP clients stop a server process soon after closing its stdin, so the node's first process does not
    outlive its client for long: a relaying process then takes the node over, or relays to whoever did, and
    its client's session simply continues."""
    state = tmp_path / "agent" / "state.json"
    lock = state.with_name("state.json.lock")
    seen_b, on_b = list_changed_counter()
    first: dict = {}
    owner_up, owner_quit = anyio.Event(), anyio.Event()

    async def owner_session() -> None:
        async with stdio_client(tmp_path / "agent", state) as owner:
            first.update(await call(owner, "darkmatter_get_identity"))
            first["pid"] = read_lock_info(lock)["pid"]
            owner_up.set()
            await owner_quit.wait()
        # leaving closed its stdin; the SDK then stops the process after its grace period

    async with anyio.create_task_group() as tg:
        tg.start_soon(owner_session)
        await owner_up.wait()
        async with stdio_client(tmp_path / "agent", state, on_message=on_b) as b, \
                stdio_client(tmp_path / "agent", state, mode="auto") as modern:
            await call(b, "darkmatter_update_bio", bio="Set before the owner left.")
            assert (await call(modern, "darkmatter_get_identity"))["port"] == first["port"]
            owner_quit.set()
            await wait_until(lambda: read_lock_info(lock).get("pid") != first["pid"], timeout=15)

            again = await call(b, "darkmatter_get_identity")  # B may be the one that takes over
            assert again["agent_id"] == first["agent_id"] and again["bio"] == "Set before the owner left."
            assert (await call(modern, "darkmatter_get_identity"))["agent_id"] == first["agent_id"]
            await call(modern, "darkmatter_update_bio", bio="Set after the handover.")
            assert (await call(b, "darkmatter_get_identity"))["bio"] == "Set after the handover."
            seen_b.clear()
            await call(modern, "darkmatter_set_status", status="inactive")
            await wait_until(lambda: seen_b, timeout=30)  # B's session gets notifications again
