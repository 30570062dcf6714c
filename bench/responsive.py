"""Responsiveness: the latencies the tests bound only generously ("arrives", "not blocked").

One ``darkmatter run`` node (http, plugin ``http_transport``, ``DARKMATTER_RATE_LIMITS=off``, the sending
peers already connected, as in ``perhop``) and the bare route (``bench.bare_server``), each its own process:

* ``list_changed``: a signed ``POST /__darkmatter__/message`` from this process to the node, timed until the
  node's MCP client (the SDK's streamable HTTP client on ``/mcp``, legacy mode, notifications on its
  standalone stream) has ``notifications/tools/list_changed``; the POST's own round trip is reported too.
  Baseline, interleaved: the same signed POST's round trip to the bare route. (tests/test_mcp_http.py and
  tests/test_mcp_stdio.py only check that the notification arrives.)
* ``status under load``: ``GET /__darkmatter__/status`` every 10 ms from this process while the load
  generator (another process, ``bench.loadgen``) keeps 8 connections posting signed messages; p50, p99 and
  max of the reads. Baseline: the same against the bare route, which serves ``/status`` too.
  (tests/security/test_resources.py only checks that the reads go on being answered.)
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time

from bench.common import (PYTHON, Child, JsonLineChild, RawHttp, child_env, dumps, free_port, new_identity,
                          percentile, ratios, signed_message, spread, wait_http)

WRITERS = 8
STATUS_INTERVAL = 0.01
NOTIFY_CAP = 10.0


def settings(quick: bool) -> dict:
    if quick:
        return {"repeats": 2, "notify": 10, "load": 600}
    return {"repeats": 3, "notify": 20, "load": 3000}


async def poll_status(port: int, stop: asyncio.Event, cap: int = 100000) -> list[float]:
    """GET /status every STATUS_INTERVAL until `stop`; each read's latency in seconds."""
    latencies: list[float] = []
    async with RawHttp("127.0.0.1", port) as http:
        for _ in range(cap):
            if stop.is_set():
                break
            started = time.perf_counter()
            status, _ = await http.request("GET", "/__darkmatter__/status")
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"/status answered {status} under load")
            await asyncio.sleep(STATUS_INTERVAL)
    return latencies


async def status_under_load(port: int, loadgen: JsonLineChild, peers: list[dict], to_id: str, count: int) -> dict:
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_status(port, stop))
    try:
        load = await loadgen.call({"job": "load", "port": port, "peers": peers, "to_id": to_id,
                                   "concurrency": WRITERS, "count": count}, timeout=600)
    finally:
        stop.set()
    latencies = sorted(await poller)
    if load["ok"] != load["count"]:
        raise RuntimeError(f"not every write was accepted: {load}")
    return {"p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "max_ms": latencies[-1] * 1000, "reads": len(latencies), "writes_per_s": load["throughput_rps"]}


async def notify_round(url: str, port: int, bare_port: int, peers: list[dict], to_id: str, count: int) -> dict:
    """`count` messages: POST -> list_changed at the node's MCP client, and the bare POST, interleaved."""
    import httpx2
    import mcp_types as types
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    seen = asyncio.Event()
    stamps: list[float] = []

    async def on_message(message) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            stamps.append(time.perf_counter())
            seen.set()

    notify, ack, bare = [], [], []
    http_client = httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30.0, read=120.0))
    async with Client(streamable_http_client(f"{url}/mcp", http_client=http_client), mode="legacy",
                      message_handler=on_message) as client, \
            RawHttp("127.0.0.1", port) as node_http, RawHttp("127.0.0.1", bare_port) as bare_http:
        await client.list_tools()
        for i in range(count + 1):  # the first one (not kept) also waits for the standalone stream to open
            seen.clear()
            stamps.clear()
            body = dumps(signed_message(peers[i % len(peers)], to_id, f"notify me {i}"))
            started = time.perf_counter()
            status, answer = await node_http.request("POST", "/__darkmatter__/message", body)
            acked = time.perf_counter()
            if status != 200:
                raise RuntimeError(f"the node answered {status}: {answer[:200]!r}")
            await asyncio.wait_for(seen.wait(), NOTIFY_CAP * (3 if i == 0 else 1))
            arrived = stamps[0]
            base_body = dumps(signed_message(peers[i % len(peers)], to_id, f"notify me {i}"))
            base_started = time.perf_counter()
            status, _ = await bare_http.request("POST", "/__darkmatter__/message", base_body)
            base_done = time.perf_counter()
            if status != 200:
                raise RuntimeError(f"the bare route answered {status}")
            if i:
                notify.append(arrived - started)
                ack.append(acked - started)
                bare.append(base_done - base_started)
            await asyncio.sleep(0.3)  # past the node's 0.2 s list_changed debounce: no late notification leaks
    return {"notify_ms": _median(notify) * 1000, "ack_ms": _median(ack) * 1000, "bare_ms": _median(bare) * 1000,
            "notify_max_ms": max(notify) * 1000}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return percentile(ordered, 50)


async def run(ctx) -> dict:
    from bench.perhop import make_template, node_env

    cfg = settings(ctx.quick)
    work = ctx.work / "responsive"
    work.mkdir(parents=True, exist_ok=True)
    peers = [new_identity() for _ in range(WRITERS)]
    dm_port, bare_port = free_port(), free_port()
    template = await make_template(work, dm_port, peers)
    agent_id = json.loads(template.read_text())["agent_id"]
    home = work / "node"
    home.mkdir(parents=True, exist_ok=True)
    state = home / "state.json"
    shutil.copyfile(template, state)
    state.chmod(0o600)
    node = Child([PYTHON, "-m", "darkmatter", "run"], node_env(home, state, dm_port), log=ctx.log("responsive-node"))
    bare = Child([PYTHON, "-m", "bench.bare_server", "--port", str(bare_port), "--agent-id", agent_id],
                 child_env(work), log=ctx.log("responsive-bare"))
    loadgen = JsonLineChild([PYTHON, "-m", "bench.loadgen"], child_env(work), log=ctx.log("responsive-loadgen"))
    notify_runs: list[dict] = []
    status_runs: dict[str, list[dict]] = {"node": [], "bare": []}
    try:
        await wait_http(dm_port, child=node, timeout=60)
        await wait_http(bare_port, child=bare, timeout=60)
        for repeat in range(cfg["repeats"]):
            notify_runs.append(await notify_round(f"http://127.0.0.1:{dm_port}", dm_port, bare_port, peers, agent_id,
                                                  cfg["notify"]))
            for kind in (("node", "bare") if repeat % 2 == 0 else ("bare", "node")):
                port = dm_port if kind == "node" else bare_port
                status_runs[kind].append(await status_under_load(port, loadgen, peers, agent_id, cfg["load"]))
    finally:
        node.stop()
        bare.stop()
        try:
            await loadgen.call({"job": "quit"}, timeout=10)
        except Exception:  # noqa: BLE001
            pass
        loadgen.stop()

    figures: dict = {"repeats": cfg["repeats"], "notify_messages_per_repeat": cfg["notify"],
                     "load_messages_per_repeat": cfg["load"], "writers": WRITERS,
                     "list_changed": {
                         "notify_ms": spread(r["notify_ms"] for r in notify_runs),
                         "notify_max_ms": spread(r["notify_max_ms"] for r in notify_runs),
                         "ack_ms": spread(r["ack_ms"] for r in notify_runs),
                         "bare_post_ms": spread(r["bare_ms"] for r in notify_runs),
                         "notify_ratio": ratios([r["notify_ms"] for r in notify_runs],
                                                [r["bare_ms"] for r in notify_runs])},
                     "status_under_load": {}}
    for kind, runs in status_runs.items():
        figures["status_under_load"][kind] = {name: spread(r[name] for r in runs)
                                              for name in ("p50_ms", "p99_ms", "max_ms", "reads", "writes_per_s")}
    node_runs, bare_runs = status_runs["node"], status_runs["bare"]
    for name in ("p50_ms", "p99_ms"):
        figures["status_under_load"][f"{name[:3]}_ratio"] = ratios([r[name] for r in node_runs],
                                                                   [r[name] for r in bare_runs])
    lc, sl = figures["list_changed"], figures["status_under_load"]
    rows = [("responsive", "ms, POST /message -> MCP client has tools/list_changed", lc["notify_ms"],
             lc["bare_post_ms"], lc["notify_ratio"], ""),
            ("responsive", "ms, the same POST /message -> 200", lc["ack_ms"], lc["bare_post_ms"], None, ""),
            ("responsive", f"/status p50 ms while {WRITERS} writers post", sl["node"]["p50_ms"], sl["bare"]["p50_ms"],
             sl["p50_ratio"], ""),
            ("responsive", f"/status p99 ms while {WRITERS} writers post", sl["node"]["p99_ms"], sl["bare"]["p99_ms"],
             sl["p99_ratio"], ""),
            ("responsive", f"/status max ms while {WRITERS} writers post", sl["node"]["max_ms"], sl["bare"]["max_ms"],
             None, "")]
    return {"figures": figures, "rows": rows}


if __name__ == "__main__":  # pragma: no cover - use `python -m bench --only responsive`
    raise SystemExit("run: .venv/bin/python -m bench --only responsive")
