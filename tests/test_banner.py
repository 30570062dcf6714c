"""The first-run banner of `darkmatter run` (darkmatter/banner.py), from a real subprocess whose stderr is a
terminal (a pseudo-terminal) or not; stdout, which carries MCP in stdio mode, never gets it."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from darkmatter.testing import env_for_tests

MARK = "  State "


def run_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKMATTER_")}
    env.update(env_for_tests(home, DARKMATTER_PLUGINS="http_transport,console"))
    env.pop("DARKMATTER_TRANSPORT")
    env.update(extra)
    return env


def read_until(fd: int, needle: str, timeout: float = 60) -> str:
    out = ""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk.decode(errors="replace")
    return out


def start(args: list[str], env: dict, *, stdin=subprocess.DEVNULL):
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "darkmatter", "run", *args], env=env, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    return proc, master


def stop(proc: subprocess.Popen, master: int) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    os.close(master)


def test_http_mode_on_a_terminal_shows_the_console_the_claude_lines_genesis_and_the_state(tmp_path):
    env = run_env(tmp_path, DARKMATTER_LOG_LEVEL="warning")
    proc, master = start(["--transport", "http", "--port", "0"], env)
    try:
        banner = read_until(master, MARK)
        assert MARK in banner, banner
        port = int(banner.split("is running at http://127.0.0.1:", 1)[1].split()[0])
        assert f"Console       http://127.0.0.1:{port}/ui" in banner
        assert f"darkmatter ui --port {port}" in banner
        assert f"claude mcp add --transport http darkmatter http://127.0.0.1:{port}/mcp" in banner
        stdio = next(line for line in banner.splitlines() if "--transport stdio" in line).strip()
        assert stdio.startswith("claude mcp add --transport stdio --env DARKMATTER_PORT=")
        assert stdio.endswith(" darkmatter -- " + str(Path(sys.executable).parent / "darkmatter") + " run")
        state = tmp_path / ".darkmatter" / "state" / "0.json"
        assert f"--env DARKMATTER_STATE_FILE={state}" in stdio  # port 0: the state file is not the port's default
        snippet = banner.split(".mcp.json", 1)[1].splitlines()[0].strip()
        assert json.loads(snippet) == {"mcpServers": {"darkmatter": {"type": "http", "url": f"http://127.0.0.1:{port}/mcp"}}}
        assert "auto-accepted (a genesis node). Set DARKMATTER_GENESIS=false" in banner
        assert f"State         {state}" in banner
    finally:
        stop(proc, master)
    assert proc.stdout.read() == b""  # nothing on stdout


def test_a_node_that_waits_for_decisions_says_so(tmp_path):
    env = run_env(tmp_path, DARKMATTER_LOG_LEVEL="warning", DARKMATTER_GENESIS="false", DARKMATTER_PLUGINS="http_transport")
    proc, master = start(["--transport", "http", "--port", "0"], env)
    try:
        banner = read_until(master, MARK)
        assert "wait for your decision" in banner and "DARKMATTER_GENESIS=true auto-accepts them" in banner
        assert "Console       not loaded" in banner
    finally:
        stop(proc, master)


def test_stdio_mode_puts_the_banner_on_stderr_and_keeps_stdout_for_mcp(tmp_path):
    env = run_env(tmp_path, DARKMATTER_LOG_LEVEL="warning", DARKMATTER_STDIO_LINGER_SECONDS="0.5")
    proc, master = start(["--transport", "stdio", "--port", "0"], env, stdin=subprocess.PIPE)
    try:
        banner = read_until(master, MARK)
        assert "claude mcp add --transport http darkmatter" in banner
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
        proc.stdin.write((json.dumps(init) + "\n").encode())
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())  # the first bytes on stdout are MCP's answer
        assert first["id"] == 1 and first["result"]["serverInfo"]["name"] == "darkmatter"
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        stop(proc, master)


def test_no_banner_when_stderr_is_not_a_terminal(tmp_path):
    env = run_env(tmp_path, DARKMATTER_LOG_LEVEL="info")
    proc = subprocess.Popen([sys.executable, "-m", "darkmatter", "run", "--transport", "http", "--port", "0"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        logged = read_until(proc.stderr.fileno(), "serving")  # the banner would follow this log line
        assert "serving" in logged, logged
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert "claude mcp add" not in logged + err.decode() and out == b""
