"""Scale: N nodes on this machine (N = 10, 50, 100), all in ONE process, each connected to K random others.

Many nodes in one process (``bench.host``: one event loop, each node its own port, state file, plugin
manager, MCP endpoint and pooled client) is far lighter than N processes and is what a 2-core machine can
hold at N = 100; the interpreter and libraries are shared, so "RSS per node" is the increment per node.
For each N, a fresh host process:

* RSS before any node (interpreter + imports), then start-up: the N nodes started in batches of 10;
* connecting: every node asks K random others over the mesh (``actions.request_connection``, 8 at a time;
  pairs already connected are skipped; the 50-connection cap is never near: degree ≈ 2K);
* the total RSS after connecting, and the host's CPU over an idle period;
* crossing: a message sent along a simple path of 5 hops through the random graph, each node forwarding
  (``actions.forward_message``, which first GETs the origin's webhook) the moment it accepts it — time until
  the 6th node has it.

Baseline, measured in the same run for each N: another host process with N bare routes (``bench.bare_server``
apps on one loop): RSS, start-up, one signed POST per connected pair (same pairs, same concurrency), and a
5-hop chain of signed POSTs (fresh connection per hop).
"""

from __future__ import annotations

import asyncio
import random

from bench.common import PYTHON, JsonLineChild, child_env, ratios, spread

K = 3
HOPS = 5
MB = 1024 * 1024


def pick_pairs(n: int, k: int, rng: random.Random) -> list[list[int]]:
    seen: set[frozenset] = set()
    pairs = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        rng.shuffle(others)
        for j in others[:k]:
            key = frozenset((i, j))
            if key not in seen:
                seen.add(key)
                pairs.append([i, j])
    return pairs


def simple_path(graph: dict[int, list[int]], hops: int, rng: random.Random) -> list[int] | None:
    """A random simple path with `hops` edges (bounded random restarts of a randomized DFS)."""
    nodes = list(graph)
    for _ in range(200):
        path = [rng.choice(nodes)]
        for _ in range(hops):
            options = [j for j in graph[path[-1]] if j not in path]
            if not options:
                break
            path.append(rng.choice(options))
        if len(path) == hops + 1:
            return path
    return None


async def one_size(ctx, n: int, crossings: int, idle_s: float) -> dict:
    rng = random.Random(1000 + n)
    work = ctx.work / f"scale-{n}"
    host = JsonLineChild([PYTHON, "-m", "bench.host"], child_env(work), log=ctx.log(f"scale-{n}"))
    bare = JsonLineChild([PYTHON, "-m", "bench.host"], child_env(work), log=ctx.log(f"scale-bare-{n}"))
    out: dict = {"n": n, "k": K}
    try:
        base_rss = (await host.call({"cmd": "proc"}))["rss"]
        bare_base_rss = (await bare.call({"cmd": "proc"}))["rss"]
        # The first node pulls in the lazily imported libraries (the MCP SDK among them): the increment per
        # node is measured from there on.
        first = await host.call({"cmd": "start", "n": 1, "dir": str(work / "nodes")}, timeout=300)
        one_rss = (await host.call({"cmd": "proc"}))["rss"]
        rest = await host.call({"cmd": "start", "n": n - 1, "dir": str(work / "nodes"), "batch": 10}, timeout=900)
        started = {"elapsed_s": first["elapsed_s"] + rest["elapsed_s"]}
        bare_first = await bare.call({"cmd": "start_bare", "n": 1}, timeout=300)
        bare_one_rss = (await bare.call({"cmd": "proc"}))["rss"]
        bare_rest = await bare.call({"cmd": "start_bare", "n": n - 1}, timeout=300)
        bare_started = {"elapsed_s": bare_first["elapsed_s"] + bare_rest["elapsed_s"]}
        pairs = pick_pairs(n, K, rng)
        connected = await host.call({"cmd": "connect", "pairs": pairs, "concurrency": 8}, timeout=900)
        if connected["failed"]:
            raise RuntimeError(f"{connected['failed']} connections failed: {connected['failures']}")
        bare_pairs = await bare.call({"cmd": "bare_pairs", "pairs": pairs, "concurrency": 8}, timeout=300)
        graph = {int(i): v for i, v in (await host.call({"cmd": "graph"})).items()}
        degrees = [len(v) for v in graph.values()]
        cross, bare_cross = [], []
        for c in range(crossings):
            path = simple_path(graph, HOPS, rng)
            if path is None:
                raise RuntimeError(f"no simple {HOPS}-hop path in the random graph for N={n}")
            relay = await host.call({"cmd": "relay", "path": path, "content": f"crossing {n} {c} {rng.random()}",
                                     "timeout": 60}, timeout=120)
            if relay["elapsed_s"] is None:
                raise RuntimeError(f"the message did not cross {path}")
            cross.append(relay["elapsed_s"])
            chain = await bare.call({"cmd": "bare_chain", "path": path}, timeout=60)
            bare_cross.append(chain["elapsed_s"])
        before = await host.call({"cmd": "proc"})
        bare_before = await bare.call({"cmd": "proc"})
        await asyncio.sleep(idle_s)
        after = await host.call({"cmd": "proc"})
        bare_after = await bare.call({"cmd": "proc"})
        out.update({
            "rss_base_mb": round(base_rss / MB, 1), "rss_total_mb": round(after["rss"] / MB, 1),
            "rss_first_node_mb": round((one_rss - base_rss) / MB, 1),
            "rss_per_node_mb": round((after["rss"] - one_rss) / MB / (n - 1), 2),
            "bare_rss_total_mb": round(bare_after["rss"] / MB, 1),
            "bare_rss_base_mb": round(bare_base_rss / MB, 1),
            "bare_rss_per_route_mb": round((bare_after["rss"] - bare_one_rss) / MB / (n - 1), 3),
            "startup_s": round(started["elapsed_s"], 3), "bare_startup_s": round(bare_started["elapsed_s"], 3),
            "connect_s": round(connected["elapsed_s"], 3), "connections": len(pairs),
            "bare_pairs_s": round(bare_pairs["elapsed_s"], 3),
            "degree": spread(degrees, 1), "crossing_s": cross, "bare_crossing_s": bare_cross,
            "idle_cpu_percent": round((after["cpu_s"] - before["cpu_s"]) / (after["t"] - before["t"]) * 100, 2),
            "bare_idle_cpu_percent": round((bare_after["cpu_s"] - bare_before["cpu_s"]) / (bare_after["t"] - bare_before["t"]) * 100, 2),
        })
    finally:
        for child in (host, bare):
            try:
                await child.call({"cmd": "quit"}, timeout=300)
            except Exception:  # noqa: BLE001
                pass
            child.stop(timeout=60)
    return out


async def run(ctx) -> dict:
    sizes = (10,) if ctx.quick else (10, 50, 100)
    crossings = 2 if ctx.quick else 5
    idle_s = 3.0 if ctx.quick else 10.0
    results = [await one_size(ctx, n, crossings, idle_s) for n in sizes]
    figures: dict = {"model": "many nodes in one process (bench.host), bare routes likewise", "k": K, "hops": HOPS,
                     "connection_cap": 50, "by_n": {}}
    rows = []
    for r in results:
        n = r["n"]
        fig = {**r, "crossing_ms": spread(x * 1000 for x in r["crossing_s"]),
               "bare_crossing_ms": spread(x * 1000 for x in r["bare_crossing_s"]),
               "crossing_ratio": ratios(r["crossing_s"], r["bare_crossing_s"]),
               "rss_ratio": round(r["rss_total_mb"] / r["bare_rss_total_mb"], 2),
               "startup_ratio": round(r["startup_s"] / r["bare_startup_s"], 2) if r["bare_startup_s"] else None,
               "connect_ratio": round(r["connect_s"] / r["bare_pairs_s"], 2) if r["bare_pairs_s"] else None}
        figures["by_n"][str(n)] = fig
        rows += [(f"scale N={n}", "total RSS MB (one process)", fig["rss_total_mb"], fig["bare_rss_total_mb"],
                  fig["rss_ratio"], "runs" if n == 100 else ""),
                 (f"scale N={n}", "RSS per extra node MB", fig["rss_per_node_mb"], fig["bare_rss_per_route_mb"], None, ""),
                 (f"scale N={n}", "start-up s (all nodes)", fig["startup_s"], fig["bare_startup_s"],
                  fig["startup_ratio"], ""),
                 (f"scale N={n}", f"connect s ({fig['connections']} connections)", fig["connect_s"],
                  fig["bare_pairs_s"], fig["connect_ratio"], ""),
                 (f"scale N={n}", f"ms to cross {HOPS} hops", fig["crossing_ms"], fig["bare_crossing_ms"],
                  fig["crossing_ratio"], ""),
                 (f"scale N={n}", "idle CPU % of one core (whole process)", fig["idle_cpu_percent"],
                  fig["bare_idle_cpu_percent"], None, "")]
    if len(results) > 1:
        first, last = results[0], results[-1]
        factor = last["n"] / first["n"]
        figures["growth"] = {
            "n_factor": factor,
            "rss_total": round(last["rss_total_mb"] / first["rss_total_mb"], 2),
            "rss_per_node": round(last["rss_per_node_mb"] / first["rss_per_node_mb"], 2),
            "startup": round(last["startup_s"] / first["startup_s"], 2),
            "startup_per_node": round(last["startup_s"] / last["n"] / (first["startup_s"] / first["n"]), 2),
            "crossing": round(spread(last["crossing_s"])["median"] / spread(first["crossing_s"])["median"], 2),
        }
        g = figures["growth"]
        rows.append(("scale growth", f"N x{factor:g}: RSS x{g['rss_total']}, start-up x{g['startup']}, "
                     f"crossing x{g['crossing']}", None, None, None, ""))
    figures["targets"] = {"100_nodes_run": any(r["n"] == 100 for r in results) or None}
    return {"figures": figures, "rows": rows}
