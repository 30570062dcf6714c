"""Cold start over stdio: process start -> the answer to tools/list, DarkMatter vs a bare SDK server.

    .venv/bin/python bench/mcp_cold_start.py [--runs 7]

Both servers are started the same way (a fresh ``python`` process speaking MCP on stdin/stdout) and get the
same three lines: ``initialize``, ``notifications/initialized``, ``tools/list``. The baseline is the official
SDK's low-level ``Server`` with one tool. Runs alternate between the servers; the medians and their ratio
are printed (target: DarkMatter <= 1.5x the baseline). DarkMatter runs with discovery, UPnP and the IP
lookup off, in a throwaway HOME, once with only ``http_transport`` and once with every installed plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = str(Path(__file__).with_name("bare_mcp.py"))  # the same bare server the bench suite uses

LINES = [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
]


def time_to_tools(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Seconds from spawning ``command`` to reading the tools/list answer, and the number of tools."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(LINES[0]).encode() + b"\n")
        proc.stdin.flush()
        while True:
            reply = json.loads(proc.stdout.readline())
            if reply.get("id") == 1:
                break
        for line in LINES[1:]:
            proc.stdin.write(json.dumps(line).encode() + b"\n")
        proc.stdin.flush()
        while True:
            reply = json.loads(proc.stdout.readline())
            if reply.get("id") == 2:
                elapsed = time.perf_counter() - start
                return elapsed, len(reply["result"]["tools"])
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="dm-bench-"))
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}
    dm_env = {**base_env, "DARKMATTER_TRANSPORT": "stdio", "DARKMATTER_PORT": "0", "DARKMATTER_DISCOVERY": "false",
              "DARKMATTER_UPNP": "false", "DARKMATTER_IP_LOOKUP_URL": "", "DARKMATTER_STUN_SERVERS": "",
              "DARKMATTER_STDIO_LINGER_SECONDS": "0", "DARKMATTER_LOG_LEVEL": "warning"}
    contenders = {
        "bare SDK server (1 tool)": ([sys.executable, BARE], base_env),
        "darkmatter, http_transport only": ([sys.executable, "-m", "darkmatter", "run"],
                                            {**dm_env, "DARKMATTER_PLUGINS": "http_transport",
                                             "DARKMATTER_STATE_FILE": str(home / "a.json")}),
        "darkmatter, all installed plugins": ([sys.executable, "-m", "darkmatter", "run"],
                                              {**dm_env, "DARKMATTER_STATE_FILE": str(home / "b.json")}),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    tools: dict[str, int] = {}
    for name, (command, env) in contenders.items():  # warm the OS page cache once, not measured
        time_to_tools(command, env)
    for _ in range(args.runs):
        for name, (command, env) in contenders.items():
            elapsed, count = time_to_tools(command, env)
            times[name].append(elapsed)
            tools[name] = count
    baseline = statistics.median(times["bare SDK server (1 tool)"])
    print(f"cold start to tools/list over stdio, median of {args.runs} runs ({os.cpu_count()} CPUs)")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"  {name:36s} {median * 1000:7.0f} ms  {tools[name]:3d} tools  ratio {median / baseline:4.2f}x")


if __name__ == "__main__":
    main()
