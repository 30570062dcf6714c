"""Opt-in: the real Claude Code CLI starts the node from ``.mcp.json`` and gets the channel (docs/protocol.md §12.5).

Set ``DARKMATTER_TEST_CLAUDE`` to a ``claude`` executable to run it (after ``npm install
@anthropic-ai/claude-code``: ``<dir>/node_modules/.bin/claude``). The model is a loopback stand-in for the
Anthropic API (``fake_api.py``); nothing leaves the machine: ANTHROPIC_BASE_URL points at it, the key is fake,
HOME is a temporary directory and non-essential traffic is off. A tap (``stdio_tap.py``) between Claude Code and
the node records what each said.

Shown: Claude Code, run with ``--dangerously-load-development-channels server:darkmatter``, starts the node from
``.mcp.json`` over stdio, is told the ``claude/channel`` capability and its instructions, receives
``notifications/claude/channel`` for a message another node sends while it runs, and calls
``darkmatter_wait_for_message``, whose result (the message) reaches the model; the sender sees the message
surfaced. Not shown: Claude Code putting the channel event into the conversation. That is gated on Anthropic's
side (a first-party login and a server-side feature flag that the CLI fetches only with non-essential traffic
on), which a test without an account and without public network access cannot pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from darkmatter.mesh import outbound as actions
from darkmatter.state import read_lock_info
from darkmatter.testing import env_for_tests, node_context

pytestmark = pytest.mark.anyio

CLAUDE = os.environ.get("DARKMATTER_TEST_CLAUDE")
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def wait_for(predicate, timeout: float):
    for _ in range(int(timeout / 0.1)):
        if value := predicate():
            return value
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.skipif(not CLAUDE, reason="set DARKMATTER_TEST_CLAUDE to a claude executable to run this test")
async def test_claude_code_starts_the_node_from_mcp_json_and_is_sent_the_channel(tmp_path):
    port = free_port()
    api_log, tap_log = tmp_path / "api.jsonl", tmp_path / "tap.jsonl"
    api = await asyncio.create_subprocess_exec(sys.executable, str(HERE / "fake_api.py"), str(port), str(api_log))
    project, home, node_dir = tmp_path / "project", tmp_path / "home", tmp_path / "node"
    for directory in (project, home, node_dir):
        directory.mkdir()
    state = node_dir / "state.json"
    node_env = env_for_tests(node_dir, DARKMATTER_TRANSPORT="stdio", DARKMATTER_PORT="0",
                             DARKMATTER_STATE_FILE=str(state), DARKMATTER_PLUGINS="http_transport",
                             DARKMATTER_STDIO_LINGER_SECONDS="0", DARKMATTER_LOG_LEVEL="warning")
    (project / ".mcp.json").write_text(json.dumps({"mcpServers": {"darkmatter": {
        "command": sys.executable,
        "args": [str(HERE / "stdio_tap.py"), str(tap_log), "--", sys.executable, "-m", "darkmatter", "run"],
        "env": node_env}}}))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
           "ANTHROPIC_API_KEY": "sk-ant-fake", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1"}
    claude = await asyncio.create_subprocess_exec(
        CLAUDE, "-p", "Wait for a message from the mesh and tell me what it says.",
        "--mcp-config", ".mcp.json", "--strict-mcp-config",
        "--dangerously-load-development-channels", "server:darkmatter",
        "--tools", "", "--allowedTools", "mcp__darkmatter",
        cwd=project, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        # Claude Code started the node from .mcp.json and finished the MCP handshake.
        await wait_for(lambda: any(e["from"] == "client" and isinstance(e["message"], dict)
                                   and e["message"].get("method") == "notifications/initialized"
                                   for e in lines(tap_log)), 60)
        info = read_lock_info(state.with_name("state.json.lock"))
        async with node_context(tmp_path / "peer") as peer:
            await actions.request_connection(peer, f"http://127.0.0.1:{info['port']}")
            sent = await actions.send_message(peer, "The build is green.", info["agent_id"])
            out, err = await asyncio.wait_for(claude.communicate(), 120)
            assert claude.returncode == 0, err.decode(errors="replace")[-2000:]
            record = peer.state["sent_messages"][sent["message_id"]]
            await wait_for(lambda: any(r["state"] == "surfaced" for r in record.get("receipts", [])), 15)
    finally:
        if claude.returncode is None:
            claude.kill()
            await claude.wait()
        api.terminate()
        await api.wait()

    traffic = lines(tap_log)
    client_said = [e["message"] for e in traffic if e["from"] == "client" and isinstance(e["message"], dict)]
    server_said = [e["message"] for e in traffic if e["from"] == "server" and isinstance(e["message"], dict)]
    hello = next(m for m in client_said if m.get("method") == "initialize")
    answer = next(m for m in server_said if m.get("id") == hello["id"])["result"]
    assert answer["capabilities"]["experimental"] == {"claude/channel": {}}
    assert '<channel source="darkmatter"' in answer["instructions"]
    pushed = [m["params"] for m in server_said if m.get("method") == "notifications/claude/channel"]
    assert [p["meta"]["message_id"] for p in pushed] == [sent["message_id"]]
    assert "The build is green." in pushed[0]["content"]
    calls = [m["params"]["name"] for m in client_said if m.get("method") == "tools/call"]
    assert "darkmatter_wait_for_message" in calls
    results = [e["tool_result"] for e in lines(api_log) if "tool_result" in e]
    assert results and "The build is green." in json.dumps(results)
