"""Simulation: N nodes in one process over the memory transport (darkmatter.testing.memory), no sockets.

For N = 1000 (and N = 100, the baseline of the same run), in a fresh child process:

* RSS before any node, then per node after all N are started (kernel, built-in plugins, the memory
  transport; every node has its own state file, plugin manager, MCP server object and outbox);
* connecting: each node asks 3 random others (degree about 6), 32 requests at a time;
* a message crossing 10 hops along a simple path of the random graph (each hop a real forward: the webhook
  GET, loop check, signed delivery and the forwarded update back to the origin);
* a broadcast from one node to all its connections;
* healing after 10 % of the nodes die: 20 random survivors broadcast (deliveries to dead peers queue in the
  outbox instead of holding the call), then the dead come back and the outbox delivers what was queued.

Every loop is bounded (counts fixed, every wait has a deadline). Figures for N = 1000 are reported with
their ratio to N = 100 measured in the same run.

    .venv/bin/python -m bench --only simulation
    .venv/bin/python -m bench.simulation --child 1000     (one size, JSON on stdout)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scale import simple_path  # noqa: E402

DEGREE_OUT = 3
CROSS_HOPS = 10
MB = 1024 * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


async def simulate(n: int, seed: int = 7) -> dict:
    from darkmatter.mesh import outbound
    from darkmatter.testing import make_node
    from darkmatter.testing.memory import MemoryNetwork

    logging.getLogger("darkmatter").setLevel(logging.ERROR)
    rng = random.Random(seed)
    out: dict = {"n": n}
    base = rss()
    work = Path(tempfile.mkdtemp(prefix=f"dm-sim-{n}-"))
    network = MemoryNetwork()
    nodes = []
    started = time.monotonic()
    for i in range(n):
        name = f"n{i}"
        node = make_node(work / name, plugins="", extra=[network.plugin(name)],
                         DARKMATTER_PUBLIC_URL=network.url(name), DARKMATTER_RATE_LIMITS="off",
                         DARKMATTER_LOG_LEVEL="error")
        await node.start(serve=False)
        nodes.append(node)
    out["start_s"] = round(time.monotonic() - started, 2)
    out["rss_mb"] = round(rss() / MB, 1)
    out["rss_per_node_kb"] = round((rss() - base) / n / 1024, 1)

    pairs = set()
    for i in range(n):
        for j in rng.sample([k for k in range(n) if k != i], DEGREE_OUT):
            pairs.add((min(i, j), max(i, j)))
    sem = asyncio.Semaphore(32)
    failures = []

    async def link(i: int, j: int) -> None:
        async with sem:
            result = await outbound.request_connection(nodes[i], nodes[j].base_url)
            if result.get("status") != "connected":
                failures.append(result)

    started = time.monotonic()
    await asyncio.gather(*(link(i, j) for i, j in sorted(pairs)))
    out["connect_s"] = round(time.monotonic() - started, 2)
    out["connections"] = len(pairs)
    out["connect_failures"] = len(failures)
    index = {node.agent_id: k for k, node in enumerate(nodes)}
    graph = {k: {index[a] for a in node.connections} for k, node in enumerate(nodes)}
    degrees = sorted(len(v) for v in graph.values())
    out["degree_median"] = degrees[len(degrees) // 2]
    out["rss_connected_mb"] = round(rss() / MB, 1)

    path = simple_path(graph, CROSS_HOPS, rng)
    if path is None:
        raise RuntimeError(f"no simple {CROSS_HOPS}-hop path")
    started = time.monotonic()
    sent = await outbound.send_message(nodes[path[0]], "crossing", nodes[path[1]].agent_id,
                                       hops_remaining=CROSS_HOPS + 1)
    mid = sent["message_id"]
    for a, b in zip(path[1:], path[2:]):
        result = await outbound.forward_message(nodes[a], mid, nodes[b].agent_id)
        if result["delivery"] != "delivered":
            raise RuntimeError(f"hop {a}->{b}: {result}")
    out["cross_10_hops_ms"] = round((time.monotonic() - started) * 1000, 1)
    origin = nodes[path[0]].state["sent_messages"][mid]
    await wait_until(lambda: len(origin["updates"]) >= CROSS_HOPS - 1, 30)
    out["cross_updates_recorded"] = len(origin["updates"])

    hub = max(range(n), key=lambda k: len(graph[k]))
    started = time.monotonic()
    result = await outbound.send_message(nodes[hub], "to all")
    out["broadcast_ms"] = round((time.monotonic() - started) * 1000, 1)
    out["broadcast_recipients"] = len(result["deliveries"])
    out["broadcast_delivered"] = sum(d["state"] == "delivered" for d in result["deliveries"].values())

    dead = set(rng.sample(range(n), n // 10))
    for k in dead:
        network.kill(f"n{k}")
    survivors = [k for k in range(n) if k not in dead and graph[k] & dead and graph[k] - dead]
    senders = rng.sample(survivors, min(20, len(survivors)))
    started = time.monotonic()
    results = await asyncio.gather(*(outbound.send_message(nodes[k], f"after the fall {k}") for k in senders))
    out["broadcast_with_dead_ms"] = round((time.monotonic() - started) * 1000, 1)
    live = queued = 0
    for k, r in zip(senders, results):
        for agent_id, d in r["deliveries"].items():
            if index[agent_id] in dead:
                queued += d["state"] == "queued"
            else:
                live += d["state"] == "delivered"
    expected_live = sum(len(graph[k] - dead) for k in senders)
    expected_dead = sum(len(graph[k] & dead) for k in senders)
    out["live_delivered"] = f"{live}/{expected_live}"
    out["dead_queued"] = f"{queued}/{expected_dead}"
    for k in dead:
        network.revive(f"n{k}")
    started = time.monotonic()
    for node in nodes:
        node.outbox.kick()

    def drained() -> bool:
        return all(not any(e["kind"] == "message" for e in nodes[k].state["outbox"]) for k in senders)

    healed = await wait_until(drained, 120)
    out["heal_s"] = round(time.monotonic() - started, 2) if healed else None
    out["requests_carried"] = network.requests
    for node in nodes:
        await node.stop()
    return out


async def run(ctx) -> dict:
    from bench.common import PYTHON

    sizes = (100, 300) if ctx.quick else (100, 1000)
    results = {}
    for n in sizes:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "bench.simulation", "--child", str(n), stdout=asyncio.subprocess.PIPE,
            stderr=open(ctx.log(f"simulation-{n}"), "wb"), cwd=str(Path(__file__).resolve().parent.parent))
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"simulation N={n} failed (exit {proc.returncode}); see {ctx.log(f'simulation-{n}')}")
        results[n] = json.loads(stdout.decode().strip().splitlines()[-1])
    small, big = results[sizes[0]], results[sizes[1]]

    def ratio(key: str):
        a, b = big.get(key), small.get(key)
        return round(a / b, 2) if a is not None and b else None

    rows = []
    for key, label in (("rss_per_node_kb", "RSS per node KB"), ("start_s", "start all nodes s"),
                       ("connect_s", "connect s"), ("cross_10_hops_ms", "10-hop crossing ms"),
                       ("broadcast_ms", "broadcast ms"), ("broadcast_with_dead_ms", "20 broadcasts, 10 % dead, ms"),
                       ("heal_s", "outbox drained after revival s")):
        rows.append((f"simulation N={sizes[1]}", label, big.get(key), small.get(key), ratio(key),
                     f"baseline: N={sizes[0]}"))
    figures = {"by_n": {str(k): v for k, v in results.items()},
               "ratios_vs_small": {k: ratio(k) for k in ("rss_per_node_kb", "start_s", "connect_s",
                                                         "cross_10_hops_ms", "broadcast_ms", "heal_s")}}
    return {"figures": figures, "rows": rows}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a node holds its state lock and journal open
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        print(json.dumps(asyncio.run(simulate(int(sys.argv[2])))))
    else:
        sys.exit("usage: python -m bench.simulation --child N (or: python -m bench --only simulation)")
