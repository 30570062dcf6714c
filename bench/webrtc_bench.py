"""Message latency and throughput over a WebRTC data channel vs over HTTP, between the same two nodes.

    .venv/bin/python bench/webrtc_bench.py [--messages 300] [--burst 1000] [--concurrency 16] [--json]

aiortc never offers 127.0.0.1 as an ICE candidate, so the benchmark runs inside a network namespace it
creates (``lo`` with 127.0.0.2 added; needs root) and deletes afterwards. Inside, two in-process nodes
(``http_transport,webrtc_transport``, STUN off, rate limits off) connect over HTTP and upgrade to WebRTC.
Every figure is measured for both transports in the same run, rounds interleaved, and reported as a
ratio webrtc / http. Three measurements:

* ``transport``: one signed /message envelope handed to the transport's ``send`` and answered (HTTP 200
  or the ack frame) -- sequential, for latency;
* ``burst``: ``--burst`` envelopes through ``send`` with ``--concurrency`` in flight, for throughput;
* ``end_to_end``: ``darkmatter.mesh.outbound.send_message`` (the tool's path: persist, outbox, sign,
  transport), sequential.

The receiver persists every accepted message before answering, on both transports (docs/protocol.md §11.2);
its inbox and dedup set are emptied between rounds so that rounds stay comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INSIDE = "DARKMATTER_BENCH_INSIDE_NETNS"
SIZES = {"small": 100, "8k": 8000}


def run_outside(argv: list[str]) -> int:
    namespace = "dmrtcb" + secrets.token_hex(3)
    made = subprocess.run(["ip", "netns", "add", namespace], capture_output=True, text=True)
    if made.returncode != 0:
        sys.stderr.write(f"cannot create a network namespace (needs root): {made.stderr.strip()}\n")
        return 2
    try:
        for args in (("link", "set", "lo", "up"), ("addr", "add", "127.0.0.2/8", "dev", "lo")):
            subprocess.run(["ip", "-n", namespace, *args], check=True, capture_output=True)
        env = {**os.environ, INSIDE: "1"}
        return subprocess.run(["ip", "netns", "exec", namespace, sys.executable, __file__, *argv], env=env,
                              timeout=1800).returncode
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"n": len(ms), "mean_ms": round(statistics.fmean(ms), 3), "p50_ms": round(ms[len(ms) // 2], 3),
            "p90_ms": round(ms[int(len(ms) * 0.9)], 3), "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3)}


async def bench(args) -> dict:
    from darkmatter.mesh import outbound as actions
    from darkmatter.testing import connect, make_node
    from darkmatter.wire import new_message_id

    from darkmatter_webrtc_transport import transport_of

    env = {"DARKMATTER_STUN_SERVERS": "", "DARKMATTER_RATE_LIMITS": "off", "DARKMATTER_INBOX_MAX": "100000",
           "DARKMATTER_HEALTH_INTERVAL": "3600"}
    plugins = "http_transport,webrtc_transport"
    root = Path(tempfile.mkdtemp(prefix="dm-webrtc-bench-"))
    a = make_node(root / "a", plugins=plugins, **env)
    b = make_node(root / "b", plugins=plugins, **env)
    async with a, b:
        await connect(a, b)
        result = await a.tools["darkmatter_upgrade_webrtc"].handler(a, {"agent_id": b.agent_id}, None)
        assert result["success"], result
        rtc = transport_of(a)
        http = next(t for t in a.transports if t.name == "http")
        conn = a.connections[b.agent_id]
        path = "/__darkmatter__/message"

        def envelope(size: int) -> dict:
            payload = {"message_id": new_message_id(), "content": "x" * size, "webhook": None,
                       "hops_remaining": 10, "metadata": {}}
            return a.outbox.sign_message(conn, payload)

        def reset() -> None:
            b.state["inbox"].clear()
            b.state["seen_message_ids"].clear()
            a.state["sent_messages"].clear()

        async def one(transport, size: int) -> float:
            body = envelope(size)
            started = time.perf_counter()
            reply = await transport.send(conn, path, body)
            elapsed = time.perf_counter() - started
            if not reply.ok or reply.transport != transport.name:
                raise RuntimeError(f"{transport.name}: {reply.describe()}")
            return elapsed

        async def sequential(transport, size: int, n: int) -> list[float]:
            return [await one(transport, size) for _ in range(n)]

        async def burst(transport, size: int, n: int) -> float:
            sem = asyncio.Semaphore(args.concurrency)

            async def limited():
                async with sem:
                    await one(transport, size)

            started = time.perf_counter()
            await asyncio.gather(*(limited() for _ in range(n)))
            return n / (time.perf_counter() - started)

        async def end_to_end(n: int) -> list[float]:
            times = []
            for _ in range(n):
                started = time.perf_counter()
                sent = await actions.send_message(a, "x" * SIZES["small"], b.agent_id)
                times.append(time.perf_counter() - started)
                if sent["deliveries"][b.agent_id]["state"] != "delivered":
                    raise RuntimeError(f"end-to-end send failed: {sent['deliveries']}")
            return times

        for transport in (http, rtc):  # warm-up: connection pool, channel, JIT-free but caches
            await sequential(transport, SIZES["small"], 30)
        reset()

        report: dict = {"transport": {}, "burst": {}, "end_to_end": {}}
        for label, size in SIZES.items():
            samples = {"http": [], "webrtc": []}
            for _ in range(2):  # interleave rounds: http, webrtc, http, webrtc
                for transport in (http, rtc):
                    samples[transport.name] += await sequential(transport, size, args.messages // 2)
                    reset()
            report["transport"][label] = {name: summary(s) for name, s in samples.items()}
            rates = {"http": [], "webrtc": []}
            for _ in range(2):
                for transport in (http, rtc):
                    rates[transport.name].append(await burst(transport, size, args.burst // 2))
                    reset()
            report["burst"][label] = {name: round(statistics.fmean(r), 1) for name, r in rates.items()}

        e2e = {"http": [], "webrtc": []}
        for _ in range(2):
            for name in ("http", "webrtc"):
                if name == "http":
                    await rtc.close(b.agent_id)
                else:
                    result = await a.tools["darkmatter_upgrade_webrtc"].handler(a, {"agent_id": b.agent_id}, None)
                    assert result["success"], result
                e2e[name] += await end_to_end(args.messages // 4)
                reset()
        report["end_to_end"] = {name: summary(s) for name, s in e2e.items()}

    ratios = {}
    for label in SIZES:
        t = report["transport"][label]
        ratios[f"latency_p50_{label}"] = round(t["webrtc"]["p50_ms"] / t["http"]["p50_ms"], 2)
        ratios[f"latency_mean_{label}"] = round(t["webrtc"]["mean_ms"] / t["http"]["mean_ms"], 2)
        ratios[f"throughput_{label}"] = round(report["burst"][label]["webrtc"] / report["burst"][label]["http"], 2)
    e = report["end_to_end"]
    ratios["end_to_end_p50"] = round(e["webrtc"]["p50_ms"] / e["http"]["p50_ms"], 2)
    report["ratios_webrtc_over_http"] = ratios
    report["setup"] = {"messages": args.messages, "burst": args.burst, "concurrency": args.concurrency,
                       "sizes_bytes_of_content": SIZES, "python": platform.python_version(),
                       "cpus": os.cpu_count(), "machine": platform.machine()}
    return report


def print_table(report: dict) -> None:
    out = sys.stdout.write
    out("WebRTC data channel vs HTTP, same two nodes, same run (ratio = webrtc / http)\n\n")
    out(f"{'measure':34} {'http':>12} {'webrtc':>12} {'ratio':>7}\n")
    for label in SIZES:
        t = report["transport"][label]
        for stat in ("p50_ms", "mean_ms", "p90_ms"):
            out(f"{'latency ' + label + ' ' + stat:34} {t['http'][stat]:>12.3f} {t['webrtc'][stat]:>12.3f} "
                f"{t['webrtc'][stat] / t['http'][stat]:>7.2f}\n")
        bu = report["burst"][label]
        out(f"{'throughput ' + label + ' msg/s':34} {bu['http']:>12.1f} {bu['webrtc']:>12.1f} "
            f"{bu['webrtc'] / bu['http']:>7.2f}\n")
    e = report["end_to_end"]
    for stat in ("p50_ms", "mean_ms"):
        out(f"{'send_message end-to-end ' + stat:34} {e['http'][stat]:>12.3f} {e['webrtc'][stat]:>12.3f} "
            f"{e['webrtc'][stat] / e['http'][stat]:>7.2f}\n")
    out("\n" + json.dumps(report["setup"]) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300, help="sequential messages per transport and size")
    parser.add_argument("--burst", type=int, default=1000, help="messages per transport and size in the burst")
    parser.add_argument("--concurrency", type=int, default=16, help="messages in flight during the burst")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = parser.parse_args()
    if os.environ.get(INSIDE) != "1":
        return run_outside(sys.argv[1:])
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report = asyncio.run(asyncio.wait_for(bench(args), 1500))
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
