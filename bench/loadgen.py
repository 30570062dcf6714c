"""The load generator: a separate process that fires pre-signed /message bodies at a server.

    .venv/bin/python -m bench.loadgen        (one JSON job per stdin line, one JSON result per stdout line)

Job ``load``: sign ``warmup + count`` distinct messages (round-robin over the given peer identities, one v2
signature each), open ``concurrency`` keep-alive connections, send the warm-up, then time ``count``
requests with ``concurrency`` in flight; report p50/p99/mean latency, throughput and status counts.

Job ``chain``: ``trips`` times, ``posts`` sequential sign-and-POST round trips on one connection (the bare
round-trip baseline: one POST per hop plus one for the response).

Bodies are signed before the clock starts, so signing costs the generator nothing during the timed part
(the two cores are shared with the servers under test).
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

from bench.common import RawHttp, dumps, percentile, signed_message


async def run_load(job: dict) -> dict:
    host, port, path = job.get("host", "127.0.0.1"), int(job["port"]), job.get("path", "/__darkmatter__/message")
    peers, to_id = job["peers"], job["to_id"]
    count, warmup = int(job["count"]), int(job.get("warmup", 0))
    concurrency = max(1, int(job["concurrency"]))
    content = "x" * int(job.get("content_size", 200))
    builder = RawHttp(host, port)
    requests = [builder.build("POST", path, dumps(signed_message(peers[i % len(peers)], to_id, content)))
                for i in range(warmup + count)]
    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    errors: list[str] = []
    conns = [RawHttp(host, port) for _ in range(concurrency)]
    for c in conns:
        await c.__aenter__()
    try:
        async def drive(batch: list[bytes], record: bool) -> None:
            queue = iter(batch)

            async def worker(conn: RawHttp) -> None:
                for data in queue:
                    started = time.perf_counter()
                    try:
                        status, _ = await conn.send_raw(data)
                    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                        errors.append(type(exc).__name__)
                        await conn.__aexit__()
                        await conn.__aenter__()
                        continue
                    if record:
                        latencies.append(time.perf_counter() - started)
                        statuses[status] += 1

            await asyncio.gather(*(worker(c) for c in conns))

        await drive(requests[:warmup], record=False)
        started = time.perf_counter()
        await drive(requests[warmup:], record=True)
        elapsed = time.perf_counter() - started
    finally:
        for c in conns:
            await c.__aexit__()
    latencies.sort()
    return {"count": count, "concurrency": concurrency, "elapsed_s": round(elapsed, 4),
            "throughput_rps": round(len(latencies) / elapsed, 1) if elapsed else None,
            "p50_ms": round(percentile(latencies, 50) * 1000, 3), "p99_ms": round(percentile(latencies, 99) * 1000, 3),
            "mean_ms": round(sum(latencies) / max(1, len(latencies)) * 1000, 3),
            "statuses": {str(k): v for k, v in statuses.items()}, "ok": statuses.get(200, 0),
            "errors": len(errors)}


async def run_chain(job: dict) -> dict:
    port, peers, to_id = int(job["port"]), job["peers"], job["to_id"]
    posts, trips = int(job["posts"]), int(job["trips"])
    content = "x" * int(job.get("content_size", 200))
    times = []
    async with RawHttp("127.0.0.1", port) as conn:
        for trip in range(trips + 1):  # the first trip warms the connection and is not kept
            started = time.perf_counter()
            for hop in range(posts):
                body = dumps(signed_message(peers[hop % len(peers)], to_id, content))
                status, _ = await conn.request("POST", "/__darkmatter__/message", body)
                if status != 200:
                    return {"error": f"bare route answered {status}"}
            if trip:
                times.append(time.perf_counter() - started)
    return {"trips_s": [round(t, 6) for t in times]}


async def main_async() -> None:
    loop = asyncio.get_running_loop()
    for _ in range(100000):
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        job = json.loads(line)
        try:
            if job["job"] == "load":
                result = await run_load(job)
            elif job["job"] == "chain":
                result = await run_chain(job)
            elif job["job"] == "quit":
                sys.stdout.write("{}\n")
                sys.stdout.flush()
                return
            else:
                result = {"error": f"unknown job {job['job']!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the bench
            result = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main_async())
