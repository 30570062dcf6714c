"""The ``darkmatter`` command, run as a real subprocess."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from darkmatter import PROTOCOL_VERSION, __version__
from darkmatter.config import Config
from darkmatter.node import Node
from darkmatter.plugins import BUILTINS, installed_plugins
from darkmatter.testing import env_for_tests

SCRIPT = Path(sys.executable).parent / "darkmatter"


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKMATTER_")}
    env.update(env_for_tests(home))
    env.update(extra)
    return env


def dm(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "darkmatter", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failure is one line on stderr (log lines may precede it), never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("darkmatter: error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def test_version_from_the_console_script_and_python_m(tmp_path):
    expected = f"darkmatter {__version__} (protocol {PROTOCOL_VERSION})"
    script = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and script.stdout.strip() == expected
    module = dm("--version", env=cli_env(tmp_path))
    assert module.returncode == 0 and module.stdout.strip() == expected


def test_help_lists_the_commands(tmp_path):
    result = dm("--help", env=cli_env(tmp_path))
    assert result.returncode == 0
    for command in ("run", "plugins", "status"):
        assert command in result.stdout


def test_plugins_json_lists_every_plugin_with_version_hooks_tools_and_routes(tmp_path):
    env = cli_env(tmp_path)
    result = dm("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    by_name = {row["name"]: row for row in rows}
    builtin_names = {m.rsplit(".", 1)[1] for m in BUILTINS}
    assert set(by_name) == builtin_names | set(installed_plugins())
    for row in rows:
        assert set(row) == {"name", "version", "builtin", "module", "hooks", "tools", "routes"}
        assert row["version"] and row["builtin"] == (row["name"] in builtin_names)
        assert all(h.startswith("dm_") for h in row["hooks"])
    assert by_name["policy"]["hooks"] == ["dm_rank_forwarding_candidates", "dm_trust_connection_request"]
    assert "dm_register_storage" in by_name["json_storage"]["hooks"]

    # The same tools and routes a node built in-process collects, each under exactly one plugin.
    node = Node(Config.from_env(env))
    listed_tools = [tool for row in rows for tool in row["tools"]]
    assert sorted(listed_tools) == sorted(node.tools)
    for name, tool in node.tools.items():
        assert name in by_name[tool.plugin]["tools"]
    listed_routes = sorted(route for row in rows for route in row["routes"])
    assert listed_routes == sorted(f"{m} {p}" for m, p in node.route_owners
                                   if not (m == "HEAD" and ("GET", p) in node.route_owners))
    assert "GET /__darkmatter__/status" in by_name["http_transport"]["routes"]
    assert "POST /__darkmatter__/connection_request" in by_name["http_transport"]["routes"]


def test_plugins_text_output_and_selection(tmp_path):
    result = dm("plugins", "--plugins", "http_transport", env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "http_transport" in result.stdout and "discovery_lan" not in result.stdout
    assert "routes:" in result.stdout and "/__darkmatter__/status" in result.stdout
    only_builtins = dm("plugins", "--json", env=cli_env(tmp_path, DARKMATTER_PLUGINS=""))
    assert {row["builtin"] for row in json.loads(only_builtins.stdout)} == {True}


def test_status_without_a_running_node_is_a_clear_error(tmp_path):
    port = free_port()
    result = dm("status", "--port", str(port), env=cli_env(tmp_path))
    assert result.returncode == 1
    line = one_error_line(result)
    assert f"no DarkMatter node answers on 127.0.0.1:{port}" in line


def test_status_of_a_service_that_is_not_a_node_is_a_clear_error(tmp_path):
    class NotANode(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotANode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = dm("status", "--port", str(server.server_address[1]), env=cli_env(tmp_path))
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1
    assert "is not a DarkMatter node" in one_error_line(result)


@contextlib.contextmanager
def running_node(home: Path, *args: str, **env: str):
    """``darkmatter run`` in HTTP mode as a subprocess; yields (process, port) once it answers."""
    port = free_port()
    proc = subprocess.Popen([str(SCRIPT), "run", "--port", str(port), "--transport", "http", *args],
                            env=cli_env(home, **env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"node exited with {proc.returncode}: {proc.stderr.read()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("node did not listen within 60 s")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_status_asks_the_running_node(tmp_path):
    # --port and --transport (given by running_node) win over the environment.
    with running_node(tmp_path, DARKMATTER_DISPLAY_NAME="cli-probe", DARKMATTER_PORT="1",
                      DARKMATTER_TRANSPORT="stdio") as (proc, port):
        as_json = dm("status", "--port", str(port), "--json", env=cli_env(tmp_path))
        assert as_json.returncode == 0, as_json.stderr
        body = json.loads(as_json.stdout)
        state = json.loads((tmp_path / ".darkmatter" / "state" / f"{port}.json").read_text())
        assert body["agent_id"] == state["agent_id"]
        assert body["display_name"] == "cli-probe" and body["protocol_version"] == PROTOCOL_VERSION
        text = dm("status", "--port", str(port), env=cli_env(tmp_path))
        assert text.returncode == 0
        assert f"agent_id: {state['agent_id']}" in text.stdout and "display_name: cli-probe" in text.stdout
        # DARKMATTER_PORT is the default port to ask.
        assert dm("status", "--json", env=cli_env(tmp_path, DARKMATTER_PORT=str(port))).returncode == 0
    assert proc.returncode == 0, proc.returncode


def test_run_with_a_corrupt_state_file_fails_in_one_line_and_keeps_the_file(tmp_path):
    state = tmp_path / "state.json"
    state.write_text('{"agent_id": "abc", ')
    result = dm("run", "--transport", "http", "--port", str(free_port()), "--state-file", str(state),
                env=cli_env(tmp_path))
    assert result.returncode == 1
    line = one_error_line(result)
    copies = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(copies) == 1
    assert str(state) in line and str(copies[0]) in line and "DARKMATTER_STATE_RECOVERY=new-identity" in line
    assert state.read_text() == '{"agent_id": "abc", '


def test_run_with_an_unknown_plugin_fails_in_one_line(tmp_path):
    result = dm("run", "--transport", "http", "--port", "0", "--plugins", "http_transport,nope", env=cli_env(tmp_path))
    assert result.returncode == 2
    assert "Unknown plugin 'nope'" in one_error_line(result)


def test_run_on_a_state_file_locked_by_a_running_node_fails_in_one_line(tmp_path):
    with running_node(tmp_path) as (proc, port):
        state = tmp_path / ".darkmatter" / "state" / f"{port}.json"
        agent_id = json.loads(state.read_text())["agent_id"]
        locked = dm("run", "--transport", "http", "--port", "0", "--state-file", str(state), env=cli_env(tmp_path))
        assert locked.returncode == 1
        line = one_error_line(locked)
        assert "already running" in line and agent_id[:12] in line and str(port) in line
