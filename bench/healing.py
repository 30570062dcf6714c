"""Mesh healing: a peer restarts on a new port — time until messages flow again.

A is a ``darkmatter run`` process driven through MCP. B, C and D are nodes hosted in one other process
(``bench.host``); A is connected to all three and B to C and D (so A has others to ask in a peer_lookup).
Each repeat measures, with arrival times taken by B itself (monotonic clock, shared by the processes):

* ``baseline``: A sends to B (``darkmatter_send_message``) — call start to B having it;
* ``after restart``: B stops and starts again on a new port (same state file, so same identity; its
  start-up broadcasts a signed peer_update, §6.3); as soon as B serves again A sends to it — time from
  B serving again to B having the message;
* ``sent while down``: B stops, A sends (the delivery fails and waits in A's outbox), B comes back on a
  new port after ``DOWN_SECONDS`` — time from B serving again to B having the message (peer_update,
  peer_lookup recovery and the outbox's retry schedule all play a part).
"""

from __future__ import annotations

import asyncio
import secrets
import time

from bench.common import PYTHON, JsonLineChild, child_env, ratios, spread
from bench.mcpnodes import McpNode

DOWN_SECONDS = 1.0
WAIT_CAP = 40.0


async def arrival(host: JsonLineChild, content: str, since: float, index: int = 0) -> float | None:
    deadline = time.monotonic() + WAIT_CAP
    for _ in range(int(WAIT_CAP / 0.01)):
        reply = await host.call({"cmd": "arrivals", "since": since})
        for item in reply["arrivals"]:
            if item["content"] == content and item["index"] == index:
                return item["t"]
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.01)
    return None


async def run(ctx) -> dict:
    repeats = 2 if ctx.quick else 5
    work = ctx.work / "healing"
    a = McpNode(work / "A", ctx.log("heal-A"))
    host = JsonLineChild([PYTHON, "-m", "bench.host"], child_env(work), log=ctx.log("heal-host"))
    base, after, down = [], [], []
    try:
        await a.start()
        nodes = (await host.call({"cmd": "start", "n": 3, "dir": str(work / "peers")}, timeout=120))["nodes"]
        b_id = nodes[0]["agent_id"]
        for n in nodes:
            r = await a.call("darkmatter_request_connection", target_url=n["url"])
            if r.get("status") != "connected":
                raise RuntimeError(f"A could not connect: {r}")
        await host.call({"cmd": "connect", "pairs": [[0, 1], [0, 2]]}, timeout=60)
        for _ in range(repeats):
            content = f"baseline {secrets.token_hex(6)}"
            started = time.monotonic()
            await a.call("darkmatter_send_message", content=content, target_agent_id=b_id)
            got = await arrival(host, content, started)
            base.append(None if got is None else got - started)

            restarted = await host.call({"cmd": "restart", "index": 0}, timeout=60)
            content = f"after restart {secrets.token_hex(6)}"
            await a.call("darkmatter_send_message", content=content, target_agent_id=b_id)
            got = await arrival(host, content, restarted["ready_t"])
            after.append(None if got is None else got - restarted["ready_t"])

            await host.call({"cmd": "stop", "indices": [0]}, timeout=60)
            content = f"sent while down {secrets.token_hex(6)}"
            sent = await a.call("darkmatter_send_message", content=content, target_agent_id=b_id)
            if sent["deliveries"][b_id]["state"] == "delivered":
                raise RuntimeError("a message to a stopped peer was reported delivered")
            await asyncio.sleep(DOWN_SECONDS)
            restarted = await host.call({"cmd": "restart", "index": 0}, timeout=60)
            got = await arrival(host, content, restarted["ready_t"] - 60)
            down.append(None if got is None else got - restarted["ready_t"])
    finally:
        await a.stop()
        try:
            await host.call({"cmd": "quit"}, timeout=60)
        except Exception:  # noqa: BLE001
            pass
        host.stop()
    ok = [i for i in range(len(base)) if base[i] is not None]
    fig = {"repeats": repeats, "down_seconds": DOWN_SECONDS,
           "baseline_ms": spread(base[i] * 1000 for i in ok),
           "after_restart_ms": spread(after[i] * 1000 for i in ok if after[i] is not None),
           "sent_while_down_ms": spread(down[i] * 1000 for i in ok if down[i] is not None),
           "lost": {"after_restart": sum(1 for x in after if x is None), "sent_while_down": sum(1 for x in down if x is None)}}
    fig["after_restart_ratio"] = ratios([after[i] for i in ok if after[i] is not None],
                                        [base[i] for i in ok if after[i] is not None])
    fig["sent_while_down_ratio"] = ratios([down[i] for i in ok if down[i] is not None],
                                          [base[i] for i in ok if down[i] is not None])
    rows = [("healing", "ms, B back on a new port -> A's next message there", fig["after_restart_ms"],
             fig["baseline_ms"], fig["after_restart_ratio"], ""),
            ("healing", f"ms, B back (down {DOWN_SECONDS:g} s) -> message sent meanwhile there",
             fig["sent_while_down_ms"], fig["baseline_ms"], fig["sent_while_down_ratio"], "")]
    return {"figures": fig, "rows": rows}
