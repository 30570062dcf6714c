"""The CLI commands that steer a running node (darkmatter/commands.py), as real subprocesses against real nodes.

The nodes run in this process on a background event loop (``LoopThread``) and serve on loopback; every command
is ``python -m darkmatter ... --port N`` talking to the node's /mcp. ``--json`` output is parsed; errors are one
line and the documented exit code (1: unreachable or failed, 2: bad input).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from darkmatter.api import send_message
from darkmatter.testing import LoopThread, connect, env_for_tests


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKMATTER_") and k != "BROWSER"}
    env.update(env_for_tests(home))
    env.update(extra)
    return env


@pytest.fixture
def loop():
    with LoopThread() as background:
        yield background


@pytest.fixture
def env(tmp_path):
    return cli_env(tmp_path / "cli-home")


def dm(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "darkmatter", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


def as_json(result: subprocess.CompletedProcess):
    return json.loads(ok(result).stdout)


def error(result: subprocess.CompletedProcess, code: int) -> str:
    """The failure: exit ``code`` and one ``darkmatter: error:`` line on stderr, never a traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("darkmatter: error: "), result.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(loop, tmp_path: Path, name: str, **env):
    return loop.start_node(tmp_path / name, plugins="http_transport,console", DARKMATTER_DISPLAY_NAME=name, **env)


def test_help_lists_every_command(env):
    result = ok(dm(env, "--help"))
    for command in ("connect", "peers", "pending", "accept", "reject", "send", "inbox", "respond", "forward",
                    "sent", "ui"):
        assert f"  {command} " in result.stdout, command


def test_connect_pending_accept_reject_and_peers(loop, tmp_path, env):
    alice = start(loop, tmp_path, "alice", DARKMATTER_GENESIS="false")
    bob, carol, dave = (start(loop, tmp_path, name) for name in ("bob", "carol", "dave"))
    a = str(alice.port)

    asked = ok(dm(env, "connect", alice.base_url, "--port", str(bob.port)))
    assert "Request sent" in asked.stdout and "decides later" in asked.stdout
    pending_json = as_json(dm(env, "connect", alice.base_url, "--port", str(carol.port), "--json"))
    assert pending_json["status"] == "pending" and pending_json["request_id"].startswith("req-")

    listed = as_json(dm(env, "pending", "--port", a, "--json"))
    assert {r["from_agent_id"] for r in listed["incoming"]} == {bob.agent_id, carol.agent_id}
    table = ok(dm(env, "pending", "--port", a)).stdout
    assert table.splitlines()[0].split() == ["REQUEST", "NAME", "AGENT", "URL", "ASKED"]
    assert "bob" in table and "carol" in table and bob.agent_id[:12] in table

    accepted = ok(dm(env, "accept", "bob", "--port", a))  # by display name
    assert "Accepted bob" in accepted.stdout and "connected" in accepted.stdout
    assert loop.call(lambda: bob.agent_id in alice.connections and alice.agent_id in bob.connections)
    carol_request = next(r["request_id"] for r in listed["incoming"] if r["from_agent_id"] == carol.agent_id)
    rejected = as_json(dm(env, "reject", carol_request[:10], "--port", a, "--json"))  # by a unique prefix
    assert rejected["status"] == "rejected" and rejected["agent_id"] == carol.agent_id
    assert loop.call(lambda: not alice.state["pending_requests"] and carol.agent_id not in alice.connections)
    assert "No connection requests waiting." in ok(dm(env, "pending", "--port", a)).stdout

    connected = ok(dm(env, "connect", dave.base_url, "--port", a))  # dave is genesis: at once
    assert f"Connected to dave ({dave.agent_id[:12]})" in connected.stdout
    peers = as_json(dm(env, "peers", "--port", a, "--json"))
    assert {c["agent_id"] for c in peers["connections"]} == {bob.agent_id, dave.agent_id}
    assert all(c["health"] == "ok" and c["transport"] == "http" for c in peers["connections"])
    peer_table = ok(dm(env, "peers", "--port", a)).stdout
    assert peer_table.splitlines()[0].split()[:5] == ["ID", "NAME", "URL", "TRANSPORT", "HEALTH"]
    assert "bob" in peer_table and "dave" in peer_table and dave.base_url in peer_table

    assert "no pending request matches 'req-nope'" in error(dm(env, "accept", "req-nope", "--port", a), 2)
    assert "Invalid URL" in error(dm(env, "connect", "not a url", "--port", a), 2)
    assert "could not connect" in error(dm(env, "connect", f"http://127.0.0.1:{free_port()}", "--port", a), 1)


def test_send_inbox_forward_respond_and_sent_with_its_route(loop, tmp_path, env):
    alice, bob, carol = (start(loop, tmp_path, name) for name in ("alice", "bob", "carol"))
    loop.run(connect(bob, alice))
    loop.run(connect(alice, carol))
    a, b, c = str(alice.port), str(bob.port), str(carol.port)

    sent = ok(dm(env, "send", "--to", "alice", "Who can review my patch?", "--port", b))
    assert sent.stdout.startswith("Sent msg-") and "alice: delivered" in sent.stdout
    message_id = sent.stdout.split()[1]
    broadcast = as_json(dm(env, "send", "A second note for everyone", "--port", b, "--json"))
    assert broadcast["success"] is True and broadcast["broadcast"] is True
    assert list(broadcast["deliveries"]) == [alice.agent_id]

    inbox = as_json(dm(env, "inbox", "--port", a, "--json"))
    assert inbox["total"] == 2
    assert {m["content"] for m in inbox["messages"]} == {"Who can review my patch?", "A second note for everyone"}
    table = ok(dm(env, "inbox", "--port", a)).stdout
    assert table.splitlines()[0].split() == ["ID", "FROM", "RECEIVED", "HOPS", "MESSAGE"]
    assert "bob" in table and "Who can review my patch?" in table and message_id[:12] in table

    forwarded = ok(dm(env, "forward", message_id[:12], "--to", "carol", "--note", "carol reviews", "--port", a))
    assert f"Forwarded {message_id} to carol: delivered (9 hops left)" in forwarded.stdout
    assert loop.call(lambda: [m["message_id"] for m in carol.state["inbox"]]) == [message_id]
    responded = ok(dm(env, "respond", message_id.removeprefix("msg-")[:8], "Looks good to me.", "--port", c))
    assert f"Response to {message_id}: delivered" in responded.stdout
    assert loop.call(lambda: [r["response"] for r in bob.state["sent_messages"][message_id]["responses"]]) \
        == ["Looks good to me."]

    listed = as_json(dm(env, "sent", "--port", b, "--json"))
    by_id = {m["message_id"]: m for m in listed["messages"]}
    assert by_id[message_id]["status"] == "responded" and by_id[message_id]["response_count"] == 1
    sent_table = ok(dm(env, "sent", "--port", b)).stdout
    assert sent_table.splitlines()[0].split() == ["ID", "STATUS", "SENT", "TO", "RESPONSES", "MESSAGE"]
    route = ok(dm(env, "sent", message_id[:14], "--port", b)).stdout
    assert "you → alice  delivered" in route
    hop = next(line for line in route.splitlines() if f"alice → {carol.agent_id[:12]}  forwarded [" in line)
    assert hop.rstrip().endswith("responded]")  # receipts (surfaced, read) may come before the answer
    assert "Looks good to me." in route
    full = as_json(dm(env, "sent", message_id, "--port", b, "--json"))
    assert [u["target_agent_id"] for u in full["updates"] if u["type"] == "forwarded"] == [carol.agent_id]

    assert "no connection matches 'nobody'" in error(dm(env, "send", "--to", "nobody", "hi", "--port", b), 2)
    assert "the text is empty" in error(dm(env, "send", "  ", "--port", b), 2)
    assert "no inbox message matches" in error(dm(env, "respond", "msg-nope", "x", "--port", a), 2)
    assert "no connection matches" in error(dm(env, "forward", message_id, "--to", "zed", "--port", a), 2)
    assert "no sent message matches" in error(dm(env, "sent", "msg-nope", "--port", b), 2)
    usage = error(dm(env, "forward", message_id, "--port", a), 2)  # a usage error is one line too
    assert "Missing option '--to'" in usage and "darkmatter forward --help" in usage


def test_a_message_id_prefix_that_matches_two_messages_is_refused(loop, tmp_path, env):
    alice, bob = start(loop, tmp_path, "alice"), start(loop, tmp_path, "bob")
    loop.run(connect(bob, alice))
    for _ in range(2):
        loop.run(send_message(bob, "same again", alice.agent_id))
    assert "matches 2 inbox messages" in error(dm(env, "respond", "msg-", "x", "--port", str(alice.port)), 2)


def lines_of(stream) -> queue.Queue:
    """The stream's lines, read by a thread, so a test can wait for one with a bound."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_inbox_follow_prints_messages_as_they_arrive(loop, tmp_path, env):
    alice, bob = start(loop, tmp_path, "alice"), start(loop, tmp_path, "bob")
    loop.run(connect(bob, alice))
    first = loop.run(send_message(bob, "already here", alice.agent_id))["message_id"]
    follow = subprocess.Popen([sys.executable, "-m", "darkmatter", "inbox", "--follow", "--json", "--port",
                               str(alice.port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
    try:
        lines = lines_of(follow.stdout)
        assert json.loads(lines.get(timeout=30))["message_id"] == first
        second = loop.run(send_message(bob, "arrived while following", alice.agent_id))["message_id"]
        line = json.loads(lines.get(timeout=30))
        assert line["message_id"] == second and line["content"] == "arrived while following"
        follow.send_signal(signal.SIGINT)
        assert follow.wait(20) == 0
        assert "Traceback" not in follow.stderr.read()
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait(10)


def test_ui_prints_the_console_url_and_opens_a_browser(loop, tmp_path, env):
    alice = start(loop, tmp_path, "alice")
    url = f"http://127.0.0.1:{alice.port}/ui"
    assert ok(dm(env, "ui", "--no-browser", "--port", str(alice.port))).stdout.strip() == url
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "fake-browser"
    browser.write_text(f"#!/bin/sh\nprintf '%s' \"$1\" > {opened}\n")
    browser.chmod(browser.stat().st_mode | stat.S_IXUSR)
    result = ok(dm({**env, "BROWSER": str(browser)}, "ui", "--port", str(alice.port)))
    assert result.stdout.strip() == url and opened.read_text() == url
    # No browser at all: the URL is printed and the person is told.
    bare = ok(dm({**env, "BROWSER": "", "PATH": str(tmp_path / "empty-bin"), "DISPLAY": "", "WAYLAND_DISPLAY": ""},
                 "ui", "--port", str(alice.port)))
    assert bare.stdout.strip() == url


def test_ui_without_the_console_plugin_is_a_clear_error(loop, tmp_path, env):
    node = loop.start_node(tmp_path / "plain", plugins="http_transport")
    assert "serves no console" in error(dm(env, "ui", "--port", str(node.port)), 1)


def test_every_command_reports_an_unreachable_node_with_exit_1(env):
    port = str(free_port())
    for args in (("connect", "http://127.0.0.1:9"), ("peers",), ("pending",), ("accept", "req-x"), ("reject", "req-x"),
                 ("send", "hi"), ("inbox",), ("inbox", "--follow"), ("respond", "msg-x", "hi"),
                 ("forward", "msg-x", "--to", "x"), ("sent",), ("sent", "msg-x"), ("ui",)):
        line = error(dm(env, *args, "--port", port), 1)
        assert f"no DarkMatter node answers on 127.0.0.1:{port}" in line, args


def test_a_service_that_is_not_a_node_is_a_clear_error(env):
    with slow_site(0) as site:
        port = site.rsplit(":", 1)[1]
        line = error(dm(env, "peers", "--port", port), 1)
    assert f"the service on 127.0.0.1:{port} does not answer as a DarkMatter node" in line


def test_a_bad_port_setting_is_bad_input(env):
    line = error(dm({**env, "DARKMATTER_PORT": "abc"}, "peers"), 2)
    assert "DARKMATTER_PORT" in line


@contextlib.contextmanager
def slow_site(delay: float):
    """A web server that takes ``delay`` seconds to answer 404 to anything: a slow target for `connect`."""
    class Slow(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            time.sleep(delay)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def read_pty(fd: int, until: float) -> str:
    out = b""
    while time.monotonic() < until:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def test_a_spinner_turns_on_a_terminal_while_the_command_waits_and_never_elsewhere(loop, tmp_path, env):
    alice = start(loop, tmp_path, "alice")
    with slow_site(1.0) as slow:
        args = [sys.executable, "-m", "darkmatter", "connect", slow, "--port", str(alice.port)]
        master, slave = os.openpty()
        try:
            child = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
            os.close(slave)
            terminal = read_pty(master, time.monotonic() + 60)
            assert child.wait(30) == 1
        finally:
            os.close(master)
        assert f"asking {slow}" in terminal and any(frame in terminal for frame in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")
        assert "\x1b[K" in terminal  # the spinner's line is cleared before the error
        assert terminal.rstrip().splitlines()[-1].lstrip("\r\x1b[K").startswith("darkmatter: error: could not connect")
        piped = dm(env, "connect", slow, "--port", str(alice.port))
        assert "could not connect" in error(piped, 1)  # stderr not a terminal: nothing but the error line
