"""Start-up: process start → the first 200 on the well-known document, vs the bare route process.

Each contender is a fresh ``python`` process on loopback, polled (every 5 ms, a new connection each time,
bounded) from the moment it was spawned until it answers 200:

* ``bare``: ``bench.bare_server`` (Starlette + hypercorn + the Ed25519 library), ``GET /__darkmatter__/status``;
* ``node``: ``darkmatter run`` in http mode with only ``http_transport`` (plus the built-ins),
  ``GET /.well-known/darkmatter.json``;
* ``node_all``: the same with every installed plugin (the default selection).

The nodes run with discovery, UPnP and the IP lookup off and a throwaway state directory per run (a fresh
identity each time, so key generation and the first durable state write are included). Runs interleave,
the order rotating between repeats; one unmeasured run of each warms the page cache. The RSS of each
process is read right after its first 200.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from bench.common import PYTHON, Child, child_env, free_port, ratios, rss_bytes, spread, wait_http

CONTENDERS = ("bare", "node", "node_all")
MB = 1024 * 1024


def spawn(kind: str, home: Path, port: int, log: Path) -> tuple[Child, str]:
    if kind == "bare":
        return Child([PYTHON, "-m", "bench.bare_server", "--port", str(port)], child_env(home), log=log), \
            "/__darkmatter__/status"
    env = child_env(home, DARKMATTER_TRANSPORT="http", DARKMATTER_PORT=str(port),
                    DARKMATTER_STATE_FILE=str(home / "state.json"))
    if kind == "node":
        env["DARKMATTER_PLUGINS"] = "http_transport"
    return Child([PYTHON, "-m", "darkmatter", "run"], env, log=log), "/.well-known/darkmatter.json"


async def one(ctx, kind: str, home: Path) -> tuple[float, int | None]:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    started = time.monotonic()
    child, path = spawn(kind, home, port, ctx.log(f"startup-{kind}"))
    try:
        ready = await wait_http(port, path, timeout=60, child=child)
        elapsed = ready - started
        rss = rss_bytes(child.pid)
    finally:
        child.stop()
        shutil.rmtree(home, ignore_errors=True)
    return elapsed, rss


async def run(ctx) -> dict:
    repeats = 3 if ctx.quick else 9
    work = ctx.work / "startup"
    times: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    rss: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    for kind in CONTENDERS:
        await one(ctx, kind, work / f"warm-{kind}")
    for r in range(repeats):
        for kind in CONTENDERS[r % 3:] + CONTENDERS[:r % 3]:
            elapsed, size = await one(ctx, kind, work / f"{kind}-{r}")
            times[kind].append(elapsed)
            if size:
                rss[kind].append(size / MB)
            await asyncio.sleep(0.05)  # let the stopped process's exit settle before the next spawn
    figures: dict = {"repeats": repeats}
    for kind in CONTENDERS:
        figures[kind + "_ms"] = spread(t * 1000 for t in times[kind])
        figures[kind + "_rss_mb"] = spread(rss[kind], 1)
    rows = []
    for kind, label in (("node", "http_transport only"), ("node_all", "every installed plugin")):
        figures[kind + "_ratio"] = ratios(times[kind], times["bare"])
        figures[kind + "_rss_ratio"] = ratios(rss[kind], rss["bare"])
        rows.append(("start-up", f"ms, spawn -> first 200 on the well-known document ({label})",
                     figures[kind + "_ms"], figures["bare_ms"], figures[kind + "_ratio"], "<= 2x"))
        rows.append(("start-up", f"RSS MB at the first 200 ({label})", figures[kind + "_rss_mb"],
                     figures["bare_rss_mb"], figures[kind + "_rss_ratio"], ""))
    figures["targets"] = {"start_le_2x_bare": figures["node_all_ratio"]["median"] <= 2.0}
    return {"figures": figures, "rows": rows}
