"""Opt-in: the real Claude Code CLI, spawned by autospawn with the default permission arguments.

Set ``DARKMATTER_TEST_CLAUDE`` to a ``claude`` executable to run it (e.g. after
``npm install @anthropic-ai/claude-code`` somewhere: ``<dir>/node_modules/.bin/claude``). The model is a
loopback stand-in for the Anthropic API (``fake_anthropic_api.py``); nothing leaves the machine:
ANTHROPIC_BASE_URL points at it, the key is fake, HOME is a temporary directory and non-essential traffic is
off. It shows that ``--tools "" --allowedTools mcp__darkmatter`` plus ``--mcp-config``/``--strict-mcp-config``
give the agent exactly the DarkMatter tools, and that it may call them without a permission prompt.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from darkmatter import api as actions
from darkmatter.testing import connect, node_context

from darkmatter_autospawn import spawner_for

pytestmark = pytest.mark.anyio

CLAUDE = os.environ.get("DARKMATTER_TEST_CLAUDE")


@pytest.mark.skipif(not CLAUDE, reason="set DARKMATTER_TEST_CLAUDE to a claude executable to run this test")
async def test_real_claude_answers_with_only_the_darkmatter_tools(tmp_path, monkeypatch):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    api_log = tmp_path / "api.jsonl"
    api = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_anthropic_api.py")), str(port),
                            str(api_log)])
    home = tmp_path / "home"
    home.mkdir()
    for name, value in {"ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}", "ANTHROPIC_API_KEY": "sk-ant-fake",
                        "HOME": str(home), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                        "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1"}.items():
        monkeypatch.setenv(name, value)
    env = {"DARKMATTER_AGENT_ENABLED": "true", "DARKMATTER_AGENT_COMMAND": CLAUDE, "DARKMATTER_AGENT_TIMEOUT": "90"}
    try:
        async with node_context(tmp_path / "a") as a, \
                node_context(tmp_path / "b", plugins="http_transport,autospawn", **env) as b:
            await connect(a, b)
            mid = (await actions.send_message(a, "What is 6 x 7?", b.agent_id))["message_id"]
            record = a.state["sent_messages"][mid]
            for _ in range(900):
                if record["status"] == "responded":
                    break
                await asyncio.sleep(0.1)
            spawner = spawner_for(b)
            for _ in range(100):
                if spawner.history:
                    break
                await asyncio.sleep(0.1)
            log = Path(spawner.history[-1]["log"]).read_text() if spawner.history else ""
            assert record["status"] == "responded", log
            assert record["response"]["response"] == "42, from a real claude -p"
            assert record["response"]["agent_id"] == b.agent_id and record["response"]["verified"]
            assert spawner.history[-1]["outcome"] == "exited with code 0"
    finally:
        api.terminate()
        api.wait(timeout=10)
    requests = [json.loads(line) for line in api_log.read_text().splitlines()]
    offered = [r for r in requests if r.get("tools")]
    assert offered, requests
    for request in offered:  # no built-in tool (Bash, Read, Edit, WebFetch, ...): only the node's
        assert all(name.startswith("mcp__darkmatter__") for name in request["tools"]), request["tools"]
    results = [r["tool_result"] for r in requests if "tool_result" in r]
    assert results and '\\"delivery\\":\\"delivered\\"' in json.dumps(results[0])
