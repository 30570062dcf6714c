"""Respond round trip over 1 and 3 hops, driven through the MCP tools, vs the bare route round trip.

Four ``darkmatter run`` processes A–B–C–D (chained connections) and one MCP session (SDK streamable HTTP
client) on each node's ``/mcp``. One trip over ``h`` hops:

1. A: ``darkmatter_send_message`` to B;
2. each of the next ``h - 1`` nodes: ``darkmatter_get_message`` until the message is there, then
   ``darkmatter_forward_message`` to the next node (which GETs A's webhook for loop detection first);
3. the last node: ``darkmatter_get_message`` until it is there, then ``darkmatter_respond_message``;
4. A: ``darkmatter_get_sent_message`` until the response is recorded.

Every poll is a tool call (bounded: 400 calls or 20 s). The time is from step 1 to step 4, as an agent
driving the nodes at machine speed would see it. The baseline, measured in the same run, is the bare
route round trip: ``h + 1`` sequential sign-and-POST round trips (one per hop plus the response) to
``bench.bare_server`` from a separate process over one keep-alive connection.

Each step that crosses a hop (send, forward, respond: the call returns once the next node has the message,
or A has the response, on disk) is also timed alone, against one plain MCP call (``darkmatter_get_identity``
on A) made right after the same trip.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time

from bench.common import PYTHON, Child, JsonLineChild, child_env, free_port, new_identity, ratios, spread, wait_http
from bench.mcpnodes import McpNode

HOPS = (1, 3)
POLL_CAP = 400
POLL_SECONDS = 20.0


async def wait_for(node: McpNode, tool: str, ok, **args) -> dict:
    deadline = time.monotonic() + POLL_SECONDS
    for _ in range(POLL_CAP):
        result = await node.try_call(tool, **args)
        if result is not None and ok(result):
            return result
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.002)
    raise TimeoutError(f"{tool} on {node.url} never showed what was awaited")


async def timed(steps: dict | None, kind: str, call):
    started = time.perf_counter()
    result = await call
    if steps is not None:
        steps.setdefault(kind, []).append(time.perf_counter() - started)
    return result


async def trip(nodes: list[McpNode], hops: int, steps: dict | None = None) -> tuple[float, int]:
    """One round trip; ``steps`` collects the duration of each MCP step that crosses a hop (send, forward,
    respond: each returns once the next node has the message or the response durably) and, as their
    baseline, of one plain MCP call (``darkmatter_get_identity`` on A, made after the trip)."""
    calls_before = sum(n.calls for n in nodes)
    a = nodes[0]
    started = time.perf_counter()
    sent = await timed(steps, "send", a.call("darkmatter_send_message", content=f"round trip {secrets.token_hex(6)}",
                                              target_agent_id=nodes[1].agent_id))
    mid = sent["message_id"]
    for i in range(1, hops):
        await wait_for(nodes[i], "darkmatter_get_message", lambda r: True, message_id=mid)
        await timed(steps, "forward", nodes[i].call("darkmatter_forward_message", message_id=mid,
                                                    target_agent_id=nodes[i + 1].agent_id))
    last = nodes[hops]
    await wait_for(last, "darkmatter_get_message", lambda r: True, message_id=mid)
    answer = await timed(steps, "respond", last.call("darkmatter_respond_message", message_id=mid,
                                                     response="the answer"))
    if answer.get("delivery") != "delivered":
        raise RuntimeError(f"response not delivered: {answer}")
    await wait_for(a, "darkmatter_get_sent_message", lambda r: bool(r.get("responses")), message_id=mid)
    elapsed = time.perf_counter() - started
    calls = sum(n.calls for n in nodes) - calls_before
    if steps is not None:
        await timed(steps, "plain", a.call("darkmatter_get_identity"))
    return elapsed, calls


async def run(ctx) -> dict:
    repeats = 3 if ctx.quick else 9
    work = ctx.work / "roundtrip"
    nodes = [McpNode(work / name, ctx.log(f"rt-{name}")) for name in "ABCD"]
    bare_port = free_port()
    bare = Child([PYTHON, "-m", "bench.bare_server", "--port", str(bare_port)], child_env(work), log=ctx.log("rt-bare"))
    loadgen = JsonLineChild([PYTHON, "-m", "bench.loadgen"], child_env(work), log=ctx.log("rt-loadgen"))
    times: dict[int, list[float]] = {h: [] for h in HOPS}
    calls: dict[int, list[int]] = {h: [] for h in HOPS}
    base: dict[int, list[float]] = {h: [] for h in HOPS}
    full_times: list[float] = []
    full_base: list[float] = []
    full_state_mb = None
    steps: list[dict[str, list[float]]] = []  # per measured trip: step kind -> durations (s)
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        await wait_http(bare_port, child=bare)
        for a, b in zip(nodes, nodes[1:]):
            result = await a.call("darkmatter_request_connection", target_url=b.url)
            if result.get("status") != "connected":
                raise RuntimeError(f"chain connection failed: {result}")
        peers = [new_identity()]
        for h in HOPS:  # one unmeasured trip each, to warm connections and code paths
            await trip(nodes, h)
        for _ in range(repeats):
            for h in HOPS:
                steps.append({})
                elapsed, n_calls = await trip(nodes, h, steps[-1])
                times[h].append(elapsed)
                calls[h].append(n_calls)
                chain = await loadgen.call({"job": "chain", "port": bare_port, "peers": peers,
                                            "to_id": "0" * 64, "posts": h + 1, "trips": 1})
                base[h].append(chain["trips_s"][0])
        # The same 1-hop trip once more with A's stores full (the state perhop calls full, about 12 MB): the
        # outbound steps (send, the response arriving at A's webhook, delivery bookkeeping) persist by
        # rewriting the whole state, unlike accepting a message.
        await nodes[0].stop()
        fill_full(nodes[0].state_file, [nodes[1].agent_id, nodes[2].agent_id], quick=ctx.quick)
        full_state_mb = round(nodes[0].state_file.stat().st_size / 1024 / 1024, 1)
        await nodes[0].start()
        await trip(nodes, 1)
        for _ in range(repeats):
            elapsed, _calls = await trip(nodes, 1)
            full_times.append(elapsed)
            chain = await loadgen.call({"job": "chain", "port": bare_port, "peers": peers,
                                        "to_id": "0" * 64, "posts": 2, "trips": 1})
            full_base.append(chain["trips_s"][0])
    finally:
        for n in nodes:
            try:
                await n.stop()
            except Exception:  # noqa: BLE001 - stopping must go on for the others
                pass
        bare.stop()
        try:
            await loadgen.call({"job": "quit"}, timeout=10)
        except Exception:  # noqa: BLE001
            pass
        loadgen.stop()
    figures: dict = {"repeats": repeats, "by_hops": {}}
    rows = []
    for h in HOPS:
        fig = {"darkmatter_ms": spread(t * 1000 for t in times[h]), "bare_ms": spread(t * 1000 for t in base[h]),
               "ratio": ratios(times[h], base[h]), "mcp_calls_per_trip": spread(calls[h], 1)}
        figures["by_hops"][str(h)] = fig
        rows.append((f"round trip {h} hop{'s' if h > 1 else ''}", "ms, A sends -> A has the response (MCP-driven)",
                     fig["darkmatter_ms"], fig["bare_ms"], fig["ratio"], "<= 20 ms" if h == 3 else ""))
        rows.append((f"round trip {h} hop{'s' if h > 1 else ''}", "MCP tool calls per trip", fig["mcp_calls_per_trip"],
                     None, None, ""))
    figures["targets"] = {"three_hops_le_20_ms": figures["by_hops"]["3"]["darkmatter_ms"]["median"] <= 20}
    # Each trip's steps paired with the plain MCP call made right after that trip.
    plain = [t["plain"][0] * 1000 for t in steps]
    figures["steps"] = {"plain_ms": spread(plain)}
    for kind in ("send", "forward", "respond"):
        ms = [x * 1000 for t in steps for x in t.get(kind, ())]
        figures["steps"][kind + "_ms"] = spread(ms)
        figures["steps"][kind + "_ratio"] = spread(x / t["plain"][0] for t in steps for x in t.get(kind, ()))
        rows.append(("MCP step across a hop", f"ms, darkmatter_{kind}_message (baseline: one plain MCP call)",
                     figures["steps"][kind + "_ms"], figures["steps"]["plain_ms"], figures["steps"][kind + "_ratio"],
                     "<= 4 ms"))
    every = [x * 1000 for t in steps for kind in ("send", "forward", "respond") for x in t.get(kind, ())]
    figures["steps"]["all_ms"] = spread(every)
    figures["targets"]["hop_step_le_4_ms"] = bool(every) and statistics.median(every) <= 4
    fig = {"darkmatter_ms": spread(t * 1000 for t in full_times), "bare_ms": spread(t * 1000 for t in full_base),
           "ratio": ratios(full_times, full_base),
           "over_empty": round(spread(full_times)["median"] / figures["by_hops"]["1"]["darkmatter_ms"]["median"] * 1000, 2)
           if full_times else None, "state_mb": full_state_mb}
    fig["over_empty_ratio"] = ratios(full_times, times[1])  # repeat i full over repeat i empty
    figures["one_hop_full_stores"] = fig
    figures["targets"]["full_over_empty_le_1_2x"] = fig["over_empty_ratio"]["median"] is not None and \
        fig["over_empty_ratio"]["median"] <= 1.2
    rows.append(("round trip 1 hop", f"ms, same with A's stores full ({full_state_mb} MB state)", fig["darkmatter_ms"],
                 fig["bare_ms"], fig["ratio"], ""))
    rows.append(("round trip 1 hop", "full stores / empty (same repeats)", None, None, fig["over_empty_ratio"],
                 "<= 1.2x"))
    return {"figures": figures, "rows": rows}


def fill_full(state_file, senders: list[str], quick: bool) -> None:
    """Fill a stopped node's state as perhop's full store (inbox entries of 1 KiB, 100 sent of 64 KiB)."""
    from bench.perhop import FULL_INBOX, fill

    journal = state_file.with_name(state_file.name + ".journal")
    if journal.exists() and journal.stat().st_size:
        raise RuntimeError("the node did not stop cleanly: its journal is not empty")
    fill(state_file, state_file, [{"agent_id": s} for s in senders], 1000 if quick else FULL_INBOX)
