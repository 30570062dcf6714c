"""DarkMatter bench: every figure a median of repeated runs (min–max), every timing paired with a baseline
measured in the same run and reported as a ratio.

    .venv/bin/python -m bench [--quick] [--only NAME[,NAME]] [--list] [--out FILE]
    .venv/bin/python bench/run.py ...        (the same)

Prints a table and writes ``bench/results/bench-<UTC time>.json`` (and ``bench/results/latest.json``).
Scenarios: see ``SCENARIOS`` below and ``bench/README.md``. Loopback only; every loop bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `darkmatter` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT  # noqa: E402

RESULTS = ROOT / "bench" / "results"

# name -> (module, what it measures)
SCENARIOS: dict[str, tuple[str, str]] = {
    "perhop": ("bench.perhop", "signed POST /message -> queued, c=1/16/64, empty and full stores, vs bare route"),
    "roundtrip": ("bench.roundtrip", "respond round trip over 1 and 3 hops through the MCP tools, vs bare route"),
    "startup": ("bench.startup", "process start -> first 200 on the well-known document, vs the bare route process"),
    "coldstart": ("bench.coldstart", "process start -> tools/list over stdio, vs a bare SDK server"),
    "idle": ("bench.idle", "RSS and CPU of an idle node, vs the bare route process"),
    "broadcast": ("bench.broadcast", "broadcast to 50 peers of which 10 are dead"),
    "healing": ("bench.healing", "a peer restarts on a new port: time until messages flow again"),
    "scale": ("bench.scale", "N = 10/50/100 nodes in one process: RSS, start-up, 5-hop crossing"),
    "simulation": ("bench.simulation", "1000 nodes over the memory transport: RSS, connect, 10 hops, broadcast, "
                                       "healing after 10 % die, vs N = 100"),
    "responsive": ("bench.responsive", "POST /message -> MCP list_changed; /status latency under write load"),
}


class Context:
    def __init__(self, quick: bool, work: Path, logs: Path):
        self.quick = quick
        self.work = work
        self.logs = logs

    def log(self, name: str) -> Path:
        """A stderr log file for a child process (kept under the run's log directory)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        return self.logs / f"{name}.log"


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {"cpus": os.cpu_count(), "cpu_model": model, "mem_gb": mem, "python": platform.python_version(),
            "platform": platform.platform(), "git_head": rev, "loadavg_start": os.getloadavg()}


def cell(s) -> str:
    if s is None:
        return ""
    if isinstance(s, (int, float)):
        return f"{s:g}"
    if s.get("median") is None:
        return "-"
    return f"{s['median']:g} [{s['min']:g}-{s['max']:g}]"


def print_table(rows: list[tuple]) -> None:
    header = ("scenario", "figure", "darkmatter", "baseline", "ratio", "target")
    table = [header] + [(r[0], r[1], cell(r[2]), cell(r[3]), cell(r[4]), r[5]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


async def run_all(names: list[str], quick: bool, keep: bool, logs: Path | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="dm-bench-"))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    ctx = Context(quick, work, logs or RESULTS / "logs" / stamp)
    report = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": quick,
              "machine": machine(), "scenarios": {}, "stamp": stamp}
    all_rows: list[tuple] = []
    try:
        for name in names:
            module = importlib.import_module(SCENARIOS[name][0])
            started = time.monotonic()
            print(f"[bench] {name}: {SCENARIOS[name][1]} ...", file=sys.stderr, flush=True)
            try:
                outcome = await module.run(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' figures
                print(f"[bench] {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                             "seconds": round(time.monotonic() - started, 1)}
                continue
            outcome["seconds"] = round(time.monotonic() - started, 1)
            all_rows.extend(outcome.pop("rows", []))
            report["scenarios"][name] = outcome
            print(f"[bench] {name} done in {outcome['seconds']} s", file=sys.stderr, flush=True)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["rows"] = [[r[0], r[1], r[2], r[3], r[4], r[5]] for r in all_rows]
    print_table(all_rows)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller loads (about 2 minutes)")
    parser.add_argument("--only", default="", help="comma-separated scenario names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--out", help="write the JSON here (default bench/results/bench-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state directories")
    parser.add_argument("--logs", help="directory for the child processes' stderr logs "
                                       "(default bench/results/logs/<time>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # The SDK client logs a traceback when a session closes while its notification stream still delivers.
    logging.getLogger("mcp.client.streamable_http").setLevel(logging.CRITICAL)
    if args.list:
        for name, (_, what) in SCENARIOS.items():
            print(f"{name:10s} {what}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    report = asyncio.run(run_all(names, args.quick, args.keep, Path(args.logs) if args.logs else None))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"bench-{report['stamp']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=str)
    out.write_text(text)
    if not args.out:
        (RESULTS / "latest.json").write_text(text)
    print(f"\nJSON: {out}", file=sys.stderr)
    failed = [n for n, s in report["scenarios"].items() if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
