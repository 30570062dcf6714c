"""Idle footprint: RSS and CPU of one idle node vs the bare route process, over the same idle minute.

Both run side by side as separate processes: ``darkmatter run`` (http mode, ``http_transport``, no
connections; discovery, UPnP and the IP lookup off, so it never probes anything) and ``bench.bare_server``.
After both answer and a settling pause, the idle period (60 s; 10 s with ``--quick``) is cut into equal
windows; each window gives both processes' RSS at its end and CPU used during it (utime + stime from
/proc, 10 ms resolution). Figures are medians over the windows, with min–max, and the CPU total.
"""

from __future__ import annotations

import asyncio

from bench.common import PYTHON, Child, child_env, cpu_seconds, free_port, monotonic, ratios, rss_bytes, spread, wait_http

MB = 1024 * 1024


async def run(ctx) -> dict:
    seconds, windows, settle = (10.0, 5, 2.0) if ctx.quick else (60.0, 6, 5.0)
    work = ctx.work / "idle"
    home = work / "node"
    home.mkdir(parents=True, exist_ok=True)
    node_port, bare_port = free_port(), free_port()
    node = Child([PYTHON, "-m", "darkmatter", "run"],
                 child_env(home, DARKMATTER_TRANSPORT="http", DARKMATTER_PORT=str(node_port),
                           DARKMATTER_STATE_FILE=str(home / "state.json"), DARKMATTER_PLUGINS="http_transport"),
                 log=ctx.log("idle-node"))
    bare = Child([PYTHON, "-m", "bench.bare_server", "--port", str(bare_port)], child_env(work), log=ctx.log("idle-bare"))
    samples = {"node": {"rss": [], "cpu": []}, "bare": {"rss": [], "cpu": []}}
    try:
        await wait_http(node_port, child=node, timeout=60)
        await wait_http(bare_port, child=bare)
        await asyncio.sleep(settle)
        last = {"node": cpu_seconds(node.pid), "bare": cpu_seconds(bare.pid)}
        window = seconds / windows
        started = monotonic()
        for w in range(windows):
            await asyncio.sleep(max(0.0, started + (w + 1) * window - monotonic()))
            for name, child in (("node", node), ("bare", bare)):
                if not child.alive():
                    raise RuntimeError(f"{name} exited while idle: {child.tail()}")
                cpu = cpu_seconds(child.pid)
                samples[name]["cpu"].append(cpu - last[name])
                samples[name]["rss"].append(rss_bytes(child.pid))
                last[name] = cpu
    finally:
        node.stop()
        bare.stop()
    window = seconds / windows
    fig = {"idle_seconds": seconds, "windows": windows}
    for name in ("node", "bare"):
        fig[name] = {"rss_mb": spread((r / MB for r in samples[name]["rss"]), 1),
                     "cpu_percent": spread((c / window * 100 for c in samples[name]["cpu"]), 2),
                     "cpu_ms_total": round(sum(samples[name]["cpu"]) * 1000, 1)}
    fig["rss_ratio"] = ratios(samples["node"]["rss"], samples["bare"]["rss"])
    node_cpu, bare_cpu = sum(samples["node"]["cpu"]), sum(samples["bare"]["cpu"])
    fig["cpu_ratio_total"] = round(node_cpu / bare_cpu, 2) if bare_cpu else None
    rows = [("idle", "RSS MB", fig["node"]["rss_mb"], fig["bare"]["rss_mb"], fig["rss_ratio"], ""),
            ("idle", f"CPU % per {window:g} s window", fig["node"]["cpu_percent"], fig["bare"]["cpu_percent"],
             fig["cpu_ratio_total"], ""),
            ("idle", f"CPU ms over {seconds:g} idle s", fig["node"]["cpu_ms_total"], fig["bare"]["cpu_ms_total"],
             fig["cpu_ratio_total"], "")]
    return {"figures": fig, "rows": rows}
