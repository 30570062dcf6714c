"""LAN discovery by real multicast, between real ``darkmatter run`` processes in network namespaces made here.

Layout (all of it exists only inside namespaces this test creates, and is deleted afterwards, also on failure):

    <tag>br   a bridge br0 (multicast snooping off) with one veth port per node namespace
    <tag>n0   eth0 10.77.0.1/24: node A0 on :8101 and node A1 on :8102 (two nodes on one host)
    <tag>n1   eth0 10.77.0.2/24: node B on :8101
    <tag>n2   eth0 10.77.0.3/24: node C on :8101, and node L bound to 127.0.0.1:8103 (listens, never sends)

Each namespace routes 224.0.0.0/4 to its eth0; the nodes use the default group and port (239.77.68.77:8470).
Every node is ``python -m darkmatter run`` with ``DARKMATTER_PLUGINS=http_transport,discovery_lan``, driven by an
MCP client in its own namespace (``netns_mcp_client.py``) over ``/mcp``. Every node must find every other
announcing node, verified and with the sender's address in its URL (read with ``darkmatter_network_info``);
then A0 connects to B through the URL it discovered, sends B a message and reads B's answer.
Needs root (CI runs as root); without it the tests are skipped with the reason, and under ``CI=true`` they
fail instead.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from darkmatter.testing import skip_unless_ci

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent
MCP_CLIENT = HERE / "netns_mcp_client.py"
SUBNET = "10.77.0"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


class JsonLines:
    """A subprocess that answers one JSON line on stdout per JSON line on stdin."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self._buffer = b""

    def readline(self, timeout: float, context) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"no answer within {timeout} s; {context()}")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"process exited ({self.proc.wait(5)}); {context()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # end of input: the client exits
            except OSError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self._log.close()


class LanNode:
    """``darkmatter run`` in a namespace, plus an MCP client beside it."""

    def __init__(self, name: str, namespace: str, host: str, port: int, home: Path, extra: dict[str, str]):
        self.name = name
        self.home = home
        self.log_path = home.parent / f"{name}.log"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "DARKMATTER_STATE_FILE": str(home / "state.json"),
            "DARKMATTER_HOST": host,
            "DARKMATTER_PORT": str(port),
            "DARKMATTER_TRANSPORT": "http",
            "DARKMATTER_PLUGINS": "http_transport,discovery_lan",
            "DARKMATTER_DISCOVERY": "true",
            "DARKMATTER_LAN_BEACON_INTERVAL": "0.5",
            "DARKMATTER_DISPLAY_NAME": name,
            "DARKMATTER_UPNP": "false",
            "DARKMATTER_IP_LOOKUP_URL": "",
            "DARKMATTER_STUN_SERVERS": "",
            "DARKMATTER_BOOTSTRAP": "false",
            **extra,
        }
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-m", "darkmatter", "run"],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=self.env)
        loopback = host.startswith("127.") or host == "0.0.0.0"  # the client then connects over loopback
        base = f"http://127.0.0.1:{port}" if loopback else f"http://{host}:{port}"
        token = [] if loopback else [str(home / "state.token")]
        self.client = JsonLines(["ip", "netns", "exec", namespace, sys.executable, str(MCP_CLIENT), base, *token],
                                self.env, home.parent / f"{name}.client.log")
        self.agent_id = ""

    def log(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        client = self.client.log_path.read_text(errors="replace") if self.client.log_path.exists() else ""
        return f"--- node {self.name}\n{text[-5000:]}\n--- client\n{client[-3000:]}"

    def ready(self) -> None:
        hello = self.client.readline(120, lambda: f"MCP client of {self.name}; logs:\n{self.log()}")
        assert hello.get("ready"), hello
        assert {"darkmatter_network_info", "darkmatter_request_connection"} <= set(hello["tools"]), hello
        self.agent_id = self.tool("darkmatter_network_info")["agent_id"]

    def tool(self, name: str, **args) -> dict:
        self.client.send({"tool": name, "args": args})
        answer = self.client.readline(90, lambda: f"tool {name} on {self.name}; logs:\n{self.log()}")
        assert not answer["is_error"], f"{name} on {self.name} failed: {answer['text']}"
        return answer["result"] if answer["result"] is not None else json.loads(answer["text"])

    def discovered(self) -> dict[str, dict]:
        return {p["agent_id"]: p for p in self.tool("darkmatter_network_info")["discovered_peers"]}

    def stop(self) -> None:
        self.client.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class Lan:
    """Namespaces joined by a bridge; everything made here is removed by ``close``."""

    def __init__(self, tmp_path: Path):
        self.tag = "dm" + secrets.token_hex(3)
        self.tmp_path = tmp_path
        self.bridge_ns = f"{self.tag}br"
        self.namespaces: list[str] = []
        self.created: list[str] = []
        self.nodes: list[LanNode] = []

    def build(self, count: int) -> None:
        ip("netns", "add", self.bridge_ns)
        self.created.append(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i in range(count):
            ns = f"{self.tag}n{i}"
            ip("netns", "add", ns)
            self.created.append(ns)
            self.namespaces.append(ns)
            ip("-n", self.bridge_ns, "link", "add", f"p{i}", "type", "veth", "peer", "name", f"e{i}")
            ip("-n", self.bridge_ns, "link", "set", f"e{i}", "netns", ns)
            ip("-n", self.bridge_ns, "link", "set", f"p{i}", "master", "br0", "up")
            ip("-n", ns, "link", "set", f"e{i}", "name", "eth0")
            ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def bare_namespace(self) -> int:
        """A namespace with only loopback up: no route to any multicast group."""
        ns = f"{self.tag}x{len(self.namespaces)}"
        ip("netns", "add", ns)
        self.created.append(ns)
        self.namespaces.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        return len(self.namespaces) - 1

    def start(self, name: str, ns_index: int, host: str, port: int, **extra: str) -> LanNode:
        home = self.tmp_path / name
        home.mkdir()
        node = LanNode(name, self.namespaces[ns_index], host, port, home, extra)
        self.nodes.append(node)
        return node

    def close(self) -> list[str]:
        problems = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                problems.append(f"stopping {node.name}: {exc}")
        self.nodes = []
        while self.created:
            ns = self.created.pop()
            result = ip("netns", "del", ns, check=False)
            if result.returncode != 0:
                problems.append(f"deleting namespace {ns}: {result.stderr.strip()}")
        return problems


@pytest.fixture
def lan(tmp_path):
    if shutil.which("ip") is None:
        skip_unless_ci("cannot create network namespaces: the `ip` command (iproute2) is not installed")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        skip_unless_ci("cannot create network namespaces: this test needs root (it runs as root in CI)")
    network = Lan(tmp_path)
    try:
        network.build(3)
    except RuntimeError as exc:
        problems = network.close()
        skip_unless_ci(f"cannot create network namespaces: {exc}" + (f" (cleanup: {problems})" if problems else ""))
    except BaseException:
        network.close()
        raise
    try:
        yield network
    finally:
        problems = network.close()
        listed = ip("netns", "list", check=False).stdout.split()
        leftover = [ns for ns in network.namespaces + [network.bridge_ns] if ns in listed]
        assert not leftover and not problems, f"cleanup failed: {problems} {leftover}"


def wait_until(fetch, done, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    value = fetch()
    while not done(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {value}")
        time.sleep(0.25)
        value = fetch()
    return value


def test_nodes_in_three_namespaces_discover_each_other_and_talk(lan):
    a0 = lan.start("A0", 0, f"{SUBNET}.1", 8101)
    a1 = lan.start("A1", 0, f"{SUBNET}.1", 8102)
    b = lan.start("B", 1, f"{SUBNET}.2", 8101)
    c = lan.start("C", 2, f"{SUBNET}.3", 8101)
    lo = lan.start("L", 2, "127.0.0.1", 8103)
    for node in lan.nodes:
        node.ready()
    senders = {a0: f"http://{SUBNET}.1:8101", a1: f"http://{SUBNET}.1:8102", b: f"http://{SUBNET}.2:8101",
               c: f"http://{SUBNET}.3:8101"}
    for node, url in senders.items():
        assert node.tool("darkmatter_network_info")["agent_url"] == url

    for node in lan.nodes:
        expected = {other.agent_id for other in senders if other is not node}
        peers = wait_until(node.discovered, lambda t: expected <= set(t), 30,
                           f"{node.name} to discover {len(expected)} peers over multicast")
        for other in senders:
            if other is node:
                continue
            entry = peers[other.agent_id]
            assert entry["source"] == "lan" and entry["verified"] is True, entry
            assert entry["url"] == senders[other], entry
            assert entry["public_key_hex"] == other.agent_id and entry["display_name"] == other.name
        assert node.agent_id not in peers
    time.sleep(1.5)  # three beacon intervals more: L, bound to loopback, must still be unknown to everyone
    for node in senders:
        assert lo.agent_id not in node.discovered(), f"{node.name} heard the loopback-only node"
    for node in lan.nodes:
        assert node.tool("darkmatter_network_info")["connections"] == [], "discovery never connects by itself"

    # A0 connects to B through the URL it discovered; they exchange a message and its answer.
    url = a0.discovered()[b.agent_id]["url"]
    result = a0.tool("darkmatter_request_connection", target_url=url)
    assert result.get("status") == "connected", result
    wait_until(lambda: b.tool("darkmatter_network_info")["connections"],
               lambda conns: any(c["agent_id"] == a0.agent_id for c in conns), 20, "B to record A0's connection")
    sent = a0.tool("darkmatter_send_message", content="hello over the LAN", target_agent_id=b.agent_id)
    message_id = sent.get("message_id")
    assert message_id, sent
    inbox = wait_until(lambda: b.tool("darkmatter_list_inbox")["messages"],
                       lambda items: any(m["message_id"] == message_id for m in items), 20, "the message to reach B")
    message = next(m for m in inbox if m["message_id"] == message_id)
    assert message["from_agent_id"] == a0.agent_id and message["content"] == "hello over the LAN"
    assert message["verified"] is True
    b.tool("darkmatter_respond_message", message_id=message_id, response="hello back")
    answered = wait_until(lambda: a0.tool("darkmatter_get_sent_message", message_id=message_id),
                          lambda s: s.get("response_count", 0) >= 1, 20, "B's answer to reach A0")
    assert [r.get("response") for r in answered["responses"]] == ["hello back"], answered


def test_without_a_multicast_route_the_failure_is_logged_once_and_the_node_runs_on(lan):
    index = lan.bare_namespace()
    node = lan.start("X", index, "0.0.0.0", 8101, DARKMATTER_LAN_BEACON_INTERVAL="0.2",
                     DARKMATTER_LOG_LEVEL="debug")
    node.ready()
    time.sleep(2.0)  # ten beacon intervals
    info = node.tool("darkmatter_network_info")  # the node still answers
    assert info["discovered_peers"] == [] and info["discovery_enabled"] is True
    node._log.flush()
    lines = [line for line in node.log_path.read_text(errors="replace").splitlines()
             if "darkmatter_discovery_lan" in line]
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 2, warnings
    assert "listening on 239.77.68.77:8470 failed" in warnings[0], warnings
    assert "send failed" in warnings[1] and "unreachable" in warnings[1], warnings
    retries = [line for line in lines if "DEBUG" in line and "send failed again" in line]
    assert len(retries) >= 5, f"it should keep trying every interval, quietly: {lines}"
