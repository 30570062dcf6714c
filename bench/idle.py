"""Idle footprint: RSS and CPU of idle nodes vs the bare route process, over the same idle minute.

Three run side by side as separate processes: ``darkmatter run`` (http mode, no connections; discovery, UPnP
and the IP lookup off, so it never probes anything) once with only ``http_transport`` and once with every
installed plugin, and ``bench.bare_server``. After all answer and a settling pause, the idle period (60 s;
10 s with ``--quick``) is cut into equal windows; each window gives every process' RSS at its end and CPU
used during it (utime + stime from /proc, 10 ms resolution). Figures are medians over the windows, with min–max, and the CPU total.
"""

from __future__ import annotations

import asyncio

from bench.common import PYTHON, Child, child_env, cpu_seconds, free_port, monotonic, ratios, rss_bytes, spread, wait_http

MB = 1024 * 1024


async def run(ctx) -> dict:
    seconds, windows, settle = (10.0, 5, 2.0) if ctx.quick else (60.0, 6, 5.0)
    work = ctx.work / "idle"
    procs: dict[str, tuple[Child, int]] = {}
    for name, plugins in (("node", "http_transport"), ("node_all", None)):
        home = work / name
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = child_env(home, DARKMATTER_TRANSPORT="http", DARKMATTER_PORT=str(port),
                        DARKMATTER_STATE_FILE=str(home / "state.json"))
        if plugins:
            env["DARKMATTER_PLUGINS"] = plugins
        procs[name] = (Child([PYTHON, "-m", "darkmatter", "run"], env, log=ctx.log(f"idle-{name}")), port)
    bare_port = free_port()
    procs["bare"] = (Child([PYTHON, "-m", "bench.bare_server", "--port", str(bare_port)], child_env(work),
                           log=ctx.log("idle-bare")), bare_port)
    samples = {name: {"rss": [], "cpu": []} for name in procs}
    try:
        for name, (child, port) in procs.items():
            await wait_http(port, child=child, timeout=60)
        await asyncio.sleep(settle)
        last = {name: cpu_seconds(child.pid) for name, (child, _) in procs.items()}
        window = seconds / windows
        started = monotonic()
        for w in range(windows):
            await asyncio.sleep(max(0.0, started + (w + 1) * window - monotonic()))
            for name, (child, _) in procs.items():
                if not child.alive():
                    raise RuntimeError(f"{name} exited while idle: {child.tail()}")
                cpu = cpu_seconds(child.pid)
                samples[name]["cpu"].append(cpu - last[name])
                samples[name]["rss"].append(rss_bytes(child.pid))
                last[name] = cpu
    finally:
        for child, _ in procs.values():
            child.stop()
    window = seconds / windows
    fig: dict = {"idle_seconds": seconds, "windows": windows}
    for name in procs:
        fig[name] = {"rss_mb": spread((r / MB for r in samples[name]["rss"]), 1),
                     "cpu_percent": spread((c / window * 100 for c in samples[name]["cpu"]), 2),
                     "cpu_ms_total": round(sum(samples[name]["cpu"]) * 1000, 1)}
    rows = []
    bare_cpu = sum(samples["bare"]["cpu"])
    for name, label in (("node", "http_transport only"), ("node_all", "every installed plugin")):
        fig[name + "_rss_ratio"] = ratios(samples[name]["rss"], samples["bare"]["rss"])
        node_cpu = sum(samples[name]["cpu"])
        fig[name + "_cpu_ratio_total"] = round(node_cpu / bare_cpu, 2) if bare_cpu else None
        rows.append(("idle", f"RSS MB ({label})", fig[name]["rss_mb"], fig["bare"]["rss_mb"],
                     fig[name + "_rss_ratio"], "<= 60 MB" if name == "node_all" else ""))
        rows.append(("idle", f"CPU ms over {seconds:g} idle s ({label})", fig[name]["cpu_ms_total"],
                     fig["bare"]["cpu_ms_total"], fig[name + "_cpu_ratio_total"], ""))
    fig["rss_ratio"] = fig["node_rss_ratio"]  # the figure's earlier name (http_transport only)
    fig["targets"] = {"idle_rss_le_60_mb": fig["node_all"]["rss_mb"]["median"] <= 60}
    return {"figures": fig, "rows": rows}
