"""MCP clients we did not write, from npm: the TypeScript SDK (``@modelcontextprotocol/sdk``, driven by
``tests/js/client.mjs``) and the MCP Inspector CLI, each over stdio and over streamable HTTP.

A session fixture installs the pinned packages into ``tests/js/node_modules`` with ``npm install``; the tests
are skipped, with the reason shown, only where ``node`` or ``npm`` is not installed, and fail there instead
under ``CI=true`` (CI has both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from darkmatter.mesh import outbound as actions
from darkmatter.testing import env_for_tests, mesh, node_context, skip_unless_ci

pytestmark = pytest.mark.anyio

JS_DIR = Path(__file__).parent / "js"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
RUN = [sys.executable, "-m", "darkmatter", "run"]


@pytest.fixture(scope="session")
def js_dir() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        skip_unless_ci("node/npm not installed: the TypeScript SDK and MCP Inspector client tests need them")
    installed = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    fresh = installed.exists() and installed.stat().st_mtime >= max(lock.stat().st_mtime if lock.exists() else 0,
                                                                    (JS_DIR / "package.json").stat().st_mtime)
    if not fresh:
        result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS_DIR,
                                capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            pytest.fail(f"npm install in {JS_DIR} failed:\n{result.stderr[-2000:]}")
    return JS_DIR


def client_env() -> dict[str, str]:
    """The test process's environment without proxy settings (node 20's fetch would use them for loopback)."""
    return {k: v for k, v in os.environ.items() if k not in PROXY_VARS}


def node_env(home: Path, **extra: str) -> dict[str, str]:
    env = env_for_tests(home, DARKMATTER_TRANSPORT="stdio", DARKMATTER_PORT="0",
                        DARKMATTER_STATE_FILE=str(home / "state.json"), DARKMATTER_PLUGINS="http_transport",
                        DARKMATTER_STDIO_LINGER_SECONDS="0", DARKMATTER_LOG_LEVEL="warning",
                        # The Inspector refuses empty -e values; a loopback URL keeps any lookup local.
                        DARKMATTER_IP_LOOKUP_URL="http://127.0.0.1:9/")
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


async def read_json_line(stream: BufferedByteReceiveStream, timeout: float = 60) -> dict:
    with anyio.fail_after(timeout):
        line = await stream.receive_until(b"\n", 4 * 1024 * 1024)
    return json.loads(line)


def check_ready(ready: dict, node_tools: set[str] | None = None) -> None:
    assert ready["phase"] == "ready", ready
    assert ready["listChanged"] is True
    names = {t["name"] for t in ready["tools"]}
    assert {"darkmatter_status", "darkmatter_send_message", "darkmatter_update_bio"} <= names
    if node_tools is not None:
        assert names == node_tools
    assert all(t["schemaType"] == "object" and t["annotations"] for t in ready["tools"])
    assert ready["badEnum"]["isError"] and "active, inactive" in ready["badEnum"]["text"]
    assert ready["wrongKey"]["isError"] and "does not belong" in ready["wrongKey"]["text"]


async def run_ts_client(js_dir: Path, spec: dict, on_ready) -> tuple[dict, dict]:
    spec = {"waitMs": 5000, **spec}
    async with await anyio.open_process(["node", str(js_dir / "client.mjs"), json.dumps(spec)], cwd=js_dir,
                                        env=client_env(), stderr=None) as proc:
        out = BufferedByteReceiveStream(proc.stdout)
        ready = await read_json_line(out)
        await on_ready(ready)
        done = await read_json_line(out)
        with anyio.fail_after(15):
            await proc.wait()
    return ready, done


async def test_typescript_sdk_client_over_stdio(js_dir, tmp_path):
    spec = {"transport": "stdio", "command": RUN[0], "args": RUN[1:], "env": node_env(tmp_path / "x")}

    async with node_context(tmp_path / "peer") as peer:
        async def mesh_event(ready: dict) -> None:
            check_ready(ready)
            me = ready["identity"]
            await actions.request_connection(peer, me["url"])
            await actions.send_message(peer, "Hello from the mesh", target_agent_id=me["agent_id"])

        ready, done = await run_ts_client(js_dir, spec, mesh_event)
    assert done["phase"] == "done", done
    assert done["listChangedAfterMs"] is not None and done["listChangedAfterMs"] < 2000
    assert "1 inbox message" in done["statusDescription"]


async def test_typescript_sdk_client_over_http(js_dir, tmp_path):
    async with mesh(tmp_path, 2) as (a, b):
        spec = {"transport": "http", "url": f"http://127.0.0.1:{b.port}/mcp"}

        async def mesh_event(ready: dict) -> None:
            check_ready(ready, set(b.tools))
            assert ready["protocolVersion"] == "2025-11-25"
            with anyio.fail_after(5):  # the SDK opens its standalone GET stream right after initializing
                while not b.mcp.sessions()["http_streams"]:
                    await anyio.sleep(0.02)
            await actions.send_message(a, "Hello over HTTP", target_agent_id=b.agent_id)

        ready, done = await run_ts_client(js_dir, spec, mesh_event)
    assert done["phase"] == "done", done
    assert done["listChangedAfterMs"] is not None and done["listChangedAfterMs"] < 2000
    assert "1 inbox message" in done["statusDescription"]


async def inspector(js_dir: Path, *args: str) -> tuple[int, dict | None, str]:
    command = ["npx", "--yes", "@modelcontextprotocol/inspector", "--cli", "--format", "json", *args]
    with anyio.fail_after(90):
        result = await anyio.run_process(command, cwd=js_dir, env=client_env(), check=False)
    out = result.stdout.decode()
    try:
        payload = json.loads(out) if out.strip() else None
    except ValueError:
        payload = None
    return result.returncode, payload, out + result.stderr.decode()


def stdio_target(home: Path) -> list[str]:
    args = []
    for key, value in node_env(home).items():
        args += ["-e", f"{key}={value}"]
    return [*args, "--", *RUN]


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_inspector_cli_over_stdio(js_dir, tmp_path, era):
    code, listed, log = await inspector(js_dir, "--method", "tools/list", "--protocol-era", era,
                                        *stdio_target(tmp_path))
    assert code == 0, log
    names = {t["name"] for t in listed["result"]["tools"]}
    assert {"darkmatter_status", "darkmatter_get_identity", "darkmatter_send_message"} <= names
    assert all(t["inputSchema"]["type"] == "object" for t in listed["result"]["tools"])

    code, called, log = await inspector(js_dir, "--method", "tools/call", "--tool-name", "darkmatter_set_status",
                                        "--tool-arg", "status=asleep", "--protocol-era", era,
                                        *stdio_target(tmp_path))
    assert code != 0 and called is not None, log  # the CLI exits non-zero for an isError result
    assert called["result"]["isError"] is True
    assert "active, inactive" in called["result"]["content"][0]["text"]


@pytest.mark.parametrize("era,version", [("legacy", "2025-11-25"), ("modern", "2026-07-28")])
async def test_inspector_cli_over_http(js_dir, tmp_path, era, version):
    async with node_context(tmp_path) as node:
        url = f"http://127.0.0.1:{node.port}/mcp"
        code, listed, log = await inspector(js_dir, url, "--method", "tools/list", "--protocol-era", era)
        assert code == 0, log
        assert {t["name"] for t in listed["result"]["tools"]} == set(node.tools)
        assert node.mcp.protocol_versions[version] > 0

        code, called, log = await inspector(js_dir, url, "--method", "tools/call", "--tool-name",
                                            "darkmatter_update_bio", "--tool-arg", "bio=Set by the Inspector",
                                            "--protocol-era", era)
        assert code == 0, log
        assert called["result"]["structuredContent"]["bio"] == "Set by the Inspector"
        assert node.state["bio"] == "Set by the Inspector"

        code, called, log = await inspector(js_dir, url, "--method", "tools/call", "--tool-name",
                                            "darkmatter_authenticate", "--tool-arg", "private_key_hex=" + "ab" * 32,
                                            "--protocol-era", era)
        assert code != 0 and called["result"]["isError"] is True, log
