"""Broadcast to 50 connected peers of which 10 are dead: time until the call returns and until the live 40
have the message.

The sender A is a ``darkmatter run`` process driven through MCP (``darkmatter_send_message`` without a
target is the broadcast). The 50 peers are real nodes hosted in one other process (``bench.host``), which
records the monotonic time each accepts each message (CLOCK_MONOTONIC is shared by all processes). A
connects to all 50 through ``darkmatter_request_connection``; then 10 peers die, in two ways, measured in
turn:

* ``gone``: the 10 nodes are stopped (their ports refuse connections, as after a crash);
* ``hung``: their ports accept connections and never answer (a frozen peer); each such delivery attempt
  ends only at the 15 s request timeout.

Rate limits are lifted on A (``DARKMATTER_RATE_LIMITS=off``) so that repeated broadcasts measure delivery,
not the per-peer message budget. The baseline, measured in the same run: 40 signed POSTs fanned out at
once from one process (40 pooled keep-alive connections) to the bare route.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from bench.common import PYTHON, Child, JsonLineChild, child_env, free_port, new_identity, ratios, spread, wait_http
from bench.mcpnodes import McpNode

PEERS = 50
DEAD = 10
WAIT_CAP = 30.0


async def one_broadcast(a: McpNode, host: JsonLineChild, live: set[int]) -> dict:
    content = f"broadcast {secrets.token_hex(6)}"
    started = time.monotonic()
    result = await a.call("darkmatter_send_message", content=content)
    returned = time.monotonic()
    states: dict[str, int] = {}
    for d in result["deliveries"].values():
        states[d["state"]] = states.get(d["state"], 0) + 1
    arrivals: dict[int, float] = {}
    deadline = returned + WAIT_CAP
    for _ in range(int(WAIT_CAP / 0.01)):
        reply = await host.call({"cmd": "arrivals", "since": started})
        for item in reply["arrivals"]:
            if item["content"] == content and item["index"] in live:
                arrivals.setdefault(item["index"], item["t"])
        if len(arrivals) >= len(live) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    all_live = max(arrivals.values()) - started if len(arrivals) == len(live) else None
    return {"returned_s": returned - started, "all_live_s": all_live, "live_reached": len(arrivals),
            "call_states": states}


async def run(ctx) -> dict:
    repeats = {"gone": 2, "hung": 2} if ctx.quick else {"gone": 7, "hung": 5}
    work = ctx.work / "broadcast"
    a = McpNode(work / "A", ctx.log("bc-A"), DARKMATTER_RATE_LIMITS="off")
    host = JsonLineChild([PYTHON, "-m", "bench.host"], child_env(work), log=ctx.log("bc-host"))
    bare_port = free_port()
    bare = Child([PYTHON, "-m", "bench.bare_server", "--port", str(bare_port)], child_env(work), log=ctx.log("bc-bare"))
    loadgen = JsonLineChild([PYTHON, "-m", "bench.loadgen"], child_env(work), log=ctx.log("bc-loadgen"))
    results: dict[str, list[dict]] = {"gone": [], "hung": []}
    baseline: dict[str, list[float]] = {"gone": [], "hung": []}
    peer = [new_identity()]
    try:
        await a.start()
        started = await host.call({"cmd": "start", "n": PEERS, "dir": str(work / "peers")}, timeout=300)
        peers = started["nodes"]
        await wait_http(bare_port, child=bare)
        for p in peers:
            r = await a.call("darkmatter_request_connection", target_url=p["url"])
            if r.get("status") != "connected":
                raise RuntimeError(f"A could not connect to peer {p['index']}: {r}")
        dead = [p["index"] for p in peers[-DEAD:]]
        live = {p["index"] for p in peers[:-DEAD]}
        await host.call({"cmd": "stop", "indices": dead}, timeout=120)
        for kind in ("gone", "hung"):
            if kind == "hung":
                for p in peers[-DEAD:]:
                    await host.call({"cmd": "block", "port": p["port"]})
            for _ in range(repeats[kind]):
                results[kind].append(await one_broadcast(a, host, live))
                fan = await loadgen.call({"job": "load", "port": bare_port, "peers": peer, "to_id": "0" * 64,
                                          "concurrency": len(live), "count": len(live), "warmup": len(live)})
                baseline[kind].append(fan["elapsed_s"])
    finally:
        await a.stop()
        for child in (host, loadgen):
            try:
                await child.call({"cmd": "quit", "job": "quit"}, timeout=60)
            except Exception:  # noqa: BLE001
                pass
            child.stop()
        bare.stop()
    figures: dict = {"peers": PEERS, "dead": DEAD, "repeats": repeats}
    rows = []
    for kind in ("gone", "hung"):
        runs = results[kind]
        fig = {"call_returns_ms": spread(r["returned_s"] * 1000 for r in runs),
               "all_live_have_it_ms": spread(r["all_live_s"] * 1000 for r in runs if r["all_live_s"] is not None),
               "live_reached": spread((r["live_reached"] for r in runs), 0),
               "bare_fanout_ms": spread(b * 1000 for b in baseline[kind]),
               "call_states": runs[-1]["call_states"] if runs else {}}
        fig["call_ratio"] = ratios([r["returned_s"] for r in runs], baseline[kind])
        fig["all_live_ratio"] = ratios([r["all_live_s"] for r in runs if r["all_live_s"] is not None],
                                       [b for r, b in zip(runs, baseline[kind]) if r["all_live_s"] is not None])
        figures[kind] = fig
        label = "dead = stopped" if kind == "gone" else "dead = hung"
        rows.append(("broadcast 50 (10 dead)", f"ms until the call returns ({label})", fig["call_returns_ms"],
                     fig["bare_fanout_ms"], fig["call_ratio"], "< 1000 ms"))
        rows.append(("broadcast 50 (10 dead)", f"ms until the live 40 have it ({label})", fig["all_live_have_it_ms"],
                     fig["bare_fanout_ms"], fig["all_live_ratio"], ""))
    figures["targets"] = {kind: (figures[kind]["call_returns_ms"]["median"] or 1e9) < 1000 for kind in ("gone", "hung")}
    return {"figures": figures, "rows": rows}
