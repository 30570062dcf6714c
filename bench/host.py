"""A node host: many DarkMatter nodes (or bare baseline routes) in ONE process, driven over stdin/stdout.

    .venv/bin/python -m bench.host        (one JSON command per stdin line, one JSON reply per stdout line)

Every hosted node is a real ``darkmatter.node.Node`` on its own loopback port with its own state file
(plugins: ``http_transport``; discovery, UPnP and IP lookup off). A probe plugin records the monotonic time
(CLOCK_MONOTONIC is one clock for every process on the machine) at which each node accepts each message,
and can relay a message along a planned path by calling ``actions.forward_message`` the moment it arrives,
as an agent that forwards at once would.

Commands: ``start`` (n nodes), ``start_bare`` (n bare routes), ``connect`` (pairs, over the mesh),
``stop``, ``restart`` (a node on a new port, same state file), ``send``, ``relay`` (a message along a path
of hosted nodes), ``bare_chain`` (the same path over bare routes), ``bare_pairs``, ``arrivals``, ``proc``,
``block`` (a port that accepts and never answers), ``quit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from darkmatter import hookimpl
from darkmatter.mesh import outbound as actions
from darkmatter.testing import make_node

from bench.common import RawHttp, cpu_seconds, dumps, new_identity, rss_bytes, signed_message

LOOP_CAP = 100000


class Probe:
    """Plugin object: arrival times and the relay plan, shared by every hosted node."""

    name = "bench_probe"

    def __init__(self, host: Host):
        self.host = host

    @hookimpl
    def dm_on_message_received(self, node, message):
        self.host.arrived(node, message)


class Host:
    def __init__(self):
        self.nodes: dict[int, object] = {}
        self.dirs: dict[int, Path] = {}
        self.env: dict[str, str] = {}
        self.arrivals: list[dict] = []
        self.index_of: dict[str, int] = {}  # agent_id -> index
        self.plans: dict[str, list[int]] = {}  # content -> path of node indices
        self.done: dict[str, asyncio.Event] = {}
        self.bare: list[tuple[asyncio.Task, asyncio.Event, int]] = []
        self.blockers: dict[int, socket.socket] = {}
        self.probe = Probe(self)

    # --- nodes -----------------------------------------------------------------------------------

    def arrived(self, node, message: dict) -> None:
        now = time.monotonic()
        index = self.index_of.get(node.agent_id)
        if len(self.arrivals) < 200000:
            self.arrivals.append({"t": now, "index": index, "message_id": message["message_id"],
                                  "content": message["content"][:64]})
        path = self.plans.get(message["content"])
        if path is None or index not in path:
            return
        position = path.index(index)
        if position == len(path) - 1:
            self.done[message["content"]].set()
            return
        target = self.nodes[path[position + 1]]
        node.spawn(actions.forward_message(node, message["message_id"], target.agent_id), name="bench-relay")

    async def _start_one(self, index: int, port: int = 0):
        node = make_node(self.dirs[index], port=port, extra=[self.probe], **self.env)
        await node.start()
        self.nodes[index] = node
        self.index_of[node.agent_id] = index
        return node

    def describe(self, index: int) -> dict:
        node = self.nodes[index]
        return {"index": index, "agent_id": node.agent_id, "port": node.port, "url": node.base_url}

    async def start(self, cmd: dict) -> dict:
        base = Path(cmd["dir"])
        if cmd.get("env") is not None:
            self.env = dict(cmd["env"])
        first = len(self.dirs)
        indices = list(range(first, first + int(cmd["n"])))
        for i in indices:
            self.dirs[i] = base / f"node{i}"
        started = time.perf_counter()
        batch = int(cmd.get("batch", 10))
        for k in range(0, len(indices), batch):
            await asyncio.gather(*(self._start_one(i) for i in indices[k:k + batch]))
        elapsed = time.perf_counter() - started
        return {"elapsed_s": elapsed, "nodes": [self.describe(i) for i in indices]}

    async def connect(self, cmd: dict) -> dict:
        sem = asyncio.Semaphore(int(cmd.get("concurrency", 8)))
        failures: list[str] = []

        async def one(pair) -> None:
            a, b = pair
            async with sem:
                url = b if isinstance(b, str) else self.nodes[b].base_url
                result = await actions.request_connection(self.nodes[a], url)
                if result.get("status") != "connected":
                    failures.append(f"{a}->{b}: {result.get('error') or result.get('status')}")

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in cmd["pairs"]))
        return {"elapsed_s": time.perf_counter() - started, "failures": failures[:10], "failed": len(failures)}

    async def stop(self, cmd: dict) -> dict:
        for i in cmd["indices"]:
            node = self.nodes.pop(i, None)
            if node is not None:
                await node.stop()
        return {"stopped": list(cmd["indices"])}

    async def restart(self, cmd: dict) -> dict:
        i = int(cmd["index"])
        old = self.nodes.pop(i, None)
        stopped = time.monotonic()
        if old is not None:
            await old.stop()
        if cmd.get("down_s"):
            await asyncio.sleep(float(cmd["down_s"]))
        started = time.monotonic()
        await self._start_one(i, int(cmd.get("port") or 0))
        return {"stopped_t": stopped, "start_t": started, "ready_t": time.monotonic(), **self.describe(i)}

    async def send(self, cmd: dict) -> dict:
        node = self.nodes[int(cmd["from"])]
        started = time.monotonic()
        result = await actions.send_message(node, cmd["content"], target_agent_id=cmd.get("to"))
        return {"t0": started, "returned_t": time.monotonic(), "message_id": result["message_id"],
                "deliveries": {k: v["state"] for k, v in result["deliveries"].items()}}

    async def relay(self, cmd: dict) -> dict:
        path = [int(i) for i in cmd["path"]]
        content = cmd["content"]
        self.plans[content] = path
        self.done[content] = asyncio.Event()
        started = time.monotonic()
        await actions.send_message(self.nodes[path[0]], content, target_agent_id=self.nodes[path[1]].agent_id)
        try:
            await asyncio.wait_for(self.done[content].wait(), float(cmd.get("timeout", 30)))
            elapsed = time.monotonic() - started
        except asyncio.TimeoutError:
            elapsed = None
        self.plans.pop(content, None)
        self.done.pop(content, None)
        return {"elapsed_s": elapsed}

    def graph(self) -> dict:
        return {str(i): [self.index_of[a] for a in n.connections if a in self.index_of]
                for i, n in self.nodes.items()}

    # --- bare baseline routes ------------------------------------------------------------------

    async def start_bare(self, cmd: dict) -> dict:
        from bench import bare_server

        started = time.perf_counter()
        ports = []
        for _ in range(int(cmd["n"])):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            shutdown = asyncio.Event()
            task = asyncio.get_running_loop().create_task(bare_server.run(port, bare_server.DEFAULT_TO, shutdown))
            self.bare.append((task, shutdown, port))
            ports.append(port)
        for port in ports:
            await _wait_port(port)
        return {"elapsed_s": time.perf_counter() - started, "ports": ports}

    async def bare_chain(self, cmd: dict) -> dict:
        """Hop i: sign a message and POST it to bare route path[i] (a fresh connection per hop, as a node
        reaches a different peer each hop)."""
        peer = new_identity()
        ports = [self.bare[i][2] for i in cmd["path"]]
        started = time.monotonic()
        for port in ports[1:]:
            body = dumps(signed_message(peer, bare_server_to(), cmd.get("content", "x" * 200)))
            async with RawHttp("127.0.0.1", port) as http:
                status, _ = await http.request("POST", "/__darkmatter__/message", body)
            if status != 200:
                return {"error": f"bare route answered {status}"}
        return {"elapsed_s": time.monotonic() - started}

    async def bare_pairs(self, cmd: dict) -> dict:
        """One signed POST per pair with the given concurrency: the bare counterpart of connecting."""
        peer = new_identity()
        sem = asyncio.Semaphore(int(cmd.get("concurrency", 8)))

        async def one(pair) -> None:
            async with sem:
                port = self.bare[pair[1]][2]
                body = dumps(signed_message(peer, bare_server_to(), "connect"))
                async with RawHttp("127.0.0.1", port) as http:
                    await http.request("POST", "/__darkmatter__/message", body)

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in cmd["pairs"]))
        return {"elapsed_s": time.perf_counter() - started}

    # --- misc ------------------------------------------------------------------------------------

    def block(self, cmd: dict) -> dict:
        """Listen on a port and never accept: connections complete in the kernel backlog and requests
        are never answered (a peer that hangs, as opposed to one that is gone)."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(cmd["port"])))
        sock.listen(512)
        self.blockers[int(cmd["port"])] = sock
        return {"blocked": int(cmd["port"])}

    def proc(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "rss": rss_bytes(pid), "cpu_s": cpu_seconds(pid), "t": time.monotonic()}

    async def close(self) -> None:
        for node in list(self.nodes.values()):
            with contextlib.suppress(Exception):
                await node.stop()
        self.nodes.clear()
        for _task, shutdown, _ in self.bare:
            shutdown.set()
        for task, _, _ in self.bare:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        for sock in self.blockers.values():
            sock.close()

    async def handle(self, cmd: dict) -> dict:
        op = cmd["cmd"]
        if op == "start":
            return await self.start(cmd)
        if op == "start_bare":
            return await self.start_bare(cmd)
        if op == "connect":
            return await self.connect(cmd)
        if op == "stop":
            return await self.stop(cmd)
        if op == "restart":
            return await self.restart(cmd)
        if op == "send":
            return await self.send(cmd)
        if op == "relay":
            return await self.relay(cmd)
        if op == "bare_chain":
            return await self.bare_chain(cmd)
        if op == "bare_pairs":
            return await self.bare_pairs(cmd)
        if op == "graph":
            return self.graph()
        if op == "arrivals":
            since = float(cmd.get("since", 0))
            return {"arrivals": [a for a in self.arrivals if a["t"] >= since]}
        if op == "proc":
            return self.proc()
        if op == "block":
            return self.block(cmd)
        if op == "describe":
            return {"nodes": [self.describe(i) for i in sorted(self.nodes)]}
        return {"error": f"unknown command {op!r}"}


def bare_server_to() -> str:
    from bench.bare_server import DEFAULT_TO

    return DEFAULT_TO


async def _wait_port(port: int, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        try:
            async with RawHttp("127.0.0.1", port) as http:
                status, _ = await http.request("GET", "/__darkmatter__/status")
            if status == 200:
                return
        except (OSError, asyncio.IncompleteReadError):
            pass
        await asyncio.sleep(0.01)
    raise TimeoutError(f"bare route on {port} did not start")


async def main_async() -> None:
    host = Host()
    loop = asyncio.get_running_loop()
    try:
        for _ in range(LOOP_CAP):
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd.get("cmd") == "quit":
                await host.close()
                sys.stdout.write("{}\n")
                sys.stdout.flush()
                return
            try:
                reply = await host.handle(cmd)
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the bench
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await host.close()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main_async())
