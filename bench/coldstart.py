"""MCP cold start: process start → ``tools/list`` answered over stdio, vs a bare SDK server with one tool.

Each contender is started the same way, by the official SDK's stdio client (``mcp.Client`` with
``StdioServerParameters``, the initialize handshake, then ``tools/list``), timed from the moment the client
is entered (it spawns the process) to the ``tools/list`` answer. Contenders, interleaved run by run:

* ``bare``: ``bench/bare_mcp.py`` (low-level ``Server``, one tool);
* ``node``: ``python -m darkmatter run`` over stdio with only ``http_transport`` (plus the built-ins);
* ``node_all``: the same with every installed plugin.

The nodes run with discovery, UPnP and the IP lookup off, ``DARKMATTER_PORT=0`` (it also binds its HTTP
port, as it always does), a throwaway state directory per run (a fresh identity is generated each time,
so key generation and the first state write are included) and ``DARKMATTER_STDIO_LINGER_SECONDS=0``.
One unmeasured run of each warms the OS page cache.

Besides the wall time, the CPU time the server process has used when ``tools/list`` is answered (its
``utime + stime`` from ``/proc``, 10 ms ticks) is reported: start-up is CPU-bound, and on a machine whose
speed swings from run to run the CPU ratio is the steadier of the two.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from bench.common import PYTHON, ROOT, child_env, ratios, spread

CONTENDERS = ("bare", "node", "node_all")


def params_for(kind: str, home: Path):
    from mcp.client.stdio import StdioServerParameters

    if kind == "bare":
        return StdioServerParameters(command=PYTHON, args=[str(ROOT / "bench" / "bare_mcp.py")],
                                     env=child_env(home), cwd=str(ROOT))
    env = child_env(home, DARKMATTER_TRANSPORT="stdio", DARKMATTER_PORT="0",
                    DARKMATTER_STATE_FILE=str(home / "state.json"), DARKMATTER_STDIO_LINGER_SECONDS="0")
    if kind == "node":
        env["DARKMATTER_PLUGINS"] = "http_transport"
    return StdioServerParameters(command=PYTHON, args=["-m", "darkmatter", "run"], env=env, cwd=str(ROOT))


def _children() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass
    return pids


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (None where /proc does not say)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


async def one(kind: str, home: Path) -> tuple[float, int, float | None]:
    from mcp import Client

    home.mkdir(parents=True, exist_ok=True)
    params = params_for(kind, home)
    before = _children()
    started = time.perf_counter()
    async with Client(params, mode="legacy", read_timeout_seconds=60) as client:
        tools = await client.list_tools()
        elapsed = time.perf_counter() - started
        spawned = _children() - before
        cpu = _cpu_seconds(spawned.pop()) if len(spawned) == 1 else None
    shutil.rmtree(home, ignore_errors=True)
    return elapsed, len(tools.tools), cpu


async def run(ctx) -> dict:
    repeats = 3 if ctx.quick else 9
    work = ctx.work / "coldstart"
    times: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    cpus: dict[str, list[float | None]] = {k: [] for k in CONTENDERS}
    tools: dict[str, int] = {}
    for kind in CONTENDERS:
        await one(kind, work / f"warm-{kind}")
    for r in range(repeats):
        for kind in CONTENDERS[r % 3:] + CONTENDERS[:r % 3]:
            elapsed, count, cpu = await one(kind, work / f"{kind}-{r}")
            times[kind].append(elapsed)
            cpus[kind].append(cpu)
            tools[kind] = count
    figures = {"repeats": repeats, "tools": tools}
    rows = []
    for kind in CONTENDERS:
        figures[kind + "_ms"] = spread(t * 1000 for t in times[kind])
        figures[kind + "_cpu_ms"] = spread(c * 1000 for c in cpus[kind] if c is not None)
    for kind, label in (("node", "http_transport only"), ("node_all", "all installed plugins")):
        figures[kind + "_ratio"] = ratios(times[kind], times["bare"])
        figures[kind + "_cpu_ratio"] = ratios(cpus[kind], cpus["bare"])
        rows.append(("MCP cold start", f"ms to tools/list over stdio ({label}, {tools[kind]} tools)",
                     figures[kind + "_ms"], figures["bare_ms"], figures[kind + "_ratio"], "<= 1.1x"))
        rows.append(("MCP cold start", f"server CPU ms at the tools/list answer ({label})",
                     figures[kind + "_cpu_ms"], figures["bare_cpu_ms"], figures[kind + "_cpu_ratio"], ""))
    figures["targets"] = {"cold_start_le_1_1x": figures["node_ratio"]["median"] <= 1.1,
                          "cold_start_all_plugins_le_1_1x": figures["node_all_ratio"]["median"] <= 1.1}
    return {"figures": figures, "rows": rows}
