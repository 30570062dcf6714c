"""Resources (docs/protocol.md §2.3, §13.1–§13.3): oversize bodies, slow loris, connection-request floods, one
peer filling the inbox, /status latency under write load, memory after many maximum-size requests."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from dm_acceptance import NodeProcess, figure, percentile, rss_kib

from darkmatter.testing import RawPeer, node_context
from darkmatter.wire import MAX_BODY

pytestmark = pytest.mark.anyio

HUNDRED_MB = 100 * 1024 * 1024


async def _head(reader: asyncio.StreamReader, timeout: float) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


async def stream_body(port: int, path: str, *, chunked: bool, total: int = HUNDRED_MB) -> tuple[bytes, int, float]:
    """Stream `total` bytes of body until the node answers; returns (response head, bytes sent, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 f"{framing}\r\n\r\n".encode())
    sent = 0
    answered = asyncio.Event()
    started = time.monotonic()

    async def pump() -> None:
        nonlocal sent
        piece = b'{"content": "' + b"x" * (64 * 1024)
        try:
            while sent < total and not answered.is_set():
                data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
                writer.write(data)
                await writer.drain()
                sent += len(piece)
        except (ConnectionError, RuntimeError):
            pass

    pumping = asyncio.create_task(pump())
    try:
        head = await _head(reader, 60)
        answered.set()
        return head, sent, time.monotonic() - started
    finally:
        answered.set()
        writer.close()
        await asyncio.gather(pumping, return_exceptions=True)


async def test_oversize_bodies_get_413_without_buffering_them(tmp_path):
    async with node_context(tmp_path) as node:
        for path in ("/__darkmatter__/message", "/__darkmatter__/connection_request", "/__darkmatter__/webhook/m"):
            # declared: refused from the Content-Length alone, before any body byte is read
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {HUNDRED_MB}\r\n\r\n".encode())
            await writer.drain()
            head = await _head(reader, 10)
            writer.close()
            assert head.split(b" ")[1] == b"413", head
            # streamed: a 100 MB generator body, chunked or with a Content-Length of exactly what it sends
            for chunked in (True, False):
                head, sent, seconds = await stream_body(node.port, path, chunked=chunked)
                assert head.split(b" ")[1] == b"413", head
                assert sent < 32 * 1024 * 1024, f"the node read {sent} bytes before refusing"
                figure(f"413 after streaming ({path}, chunked={chunked})", f"{sent / 1e6:.1f} MB in {seconds:.2f} s")
        async with httpx.AsyncClient(trust_env=False) as http:
            ok = await http.get(f"http://127.0.0.1:{node.port}/__darkmatter__/status")
            assert ok.status_code == 200
            exact = await http.post(f"http://127.0.0.1:{node.port}/__darkmatter__/message",
                                    content=b" " * (MAX_BODY + 1))
            assert exact.status_code == 413 and exact.json()["code"] == "too_large"


async def test_slow_loris_connections_are_cut(tmp_path):
    """Dripping and idle connections are cut by the read timeout, and meanwhile -- before any of them is
    cut -- the node answers everyone else."""
    async with node_context(tmp_path, DARKMATTER_HTTP_READ_TIMEOUT="3") as node:
        port = node.port

        async def open_(first: bytes):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(first)
            await writer.drain()
            return reader, writer

        async def drip(writer, data: bytes, interval: float, stop: asyncio.Event) -> None:
            try:
                for i in range(len(data)):
                    if stop.is_set():
                        return
                    writer.write(data[i:i + 1])
                    await writer.drain()
                    await asyncio.sleep(interval)
            except (ConnectionError, RuntimeError):
                pass

        async def closed_within(reader, seconds: float) -> tuple[bool, bytes, float]:
            """Whether the node closed the connection within `seconds`, what it sent, and when it closed."""
            data = b""
            try:
                async with asyncio.timeout(seconds):
                    while chunk := await reader.read(65536):
                        data += chunk
            except TimeoutError:
                return False, data, float("inf")
            except ConnectionError:
                pass
            return True, data, time.monotonic()

        stop = asyncio.Event()
        # 1. headers one byte every 0.25 s; 2. a complete head, then the body one byte every 0.25 s;
        # 3. idle connections that never send a byte
        header_reader, header_writer = await open_(b"POST /__darkmatter__/message HTTP/1.1\r\n")
        header_task = asyncio.create_task(drip(header_writer, b"Host: 127.0.0.1\r\nX-Slow: " + b"a" * 200,
                                               0.25, stop))
        body_reader, body_writer = await open_(b"POST /__darkmatter__/message HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                               b"Content-Length: 400\r\n\r\n")
        body_task = asyncio.create_task(drip(body_writer, b"{" + b" " * 399, 0.25, stop))
        idle = [await open_(b"") for _ in range(100)]
        started = time.monotonic()
        watches = [asyncio.create_task(closed_within(r, 12)) for r in (header_reader, body_reader)]
        watches += [asyncio.create_task(closed_within(r, 12)) for r, _ in idle]
        # the node keeps serving everyone else meanwhile (the timeout only bounds a node that does not)
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            for _ in range(5):
                assert (await http.get(f"http://127.0.0.1:{port}/__darkmatter__/status")).status_code == 200
        served = time.monotonic()
        (cut_header, _, header_at), (cut_body, answer, body_at), *idle_watches = await asyncio.gather(*watches)
        idle_cut = [closed for closed, _, _ in idle_watches]
        first_cut = min([header_at, body_at] + [at for _, _, at in idle_watches])
        elapsed = time.monotonic() - started
        stop.set()
        await asyncio.gather(header_task, body_task, return_exceptions=True)
        for _, w in [(None, header_writer), (None, body_writer), *idle]:
            w.close()
        assert cut_header, "a dripping header kept its connection"
        assert cut_body and (answer == b"" or answer.split(b" ")[1] == b"408"), answer[:80]
        assert all(idle_cut), f"{idle_cut.count(False)} idle connections were kept"
        assert served < first_cut, "/status was answered only once slow clients had been cut"
        figure("slow loris cut after (read timeout 3 s)", f"{elapsed:.1f} s for 102 connections; 5 status reads "
               f"served {served - started:.2f} s in, first cut at {first_cut - started:.2f} s")


async def test_a_connection_request_flood_from_many_fake_ids_does_not_lock_out_a_real_peer(tmp_path):
    """Loopback sources are bucketed by claimed id (§13.1), so the node-wide bucket is what stops a flood of
    fresh identities: it admits at most its capacity plus the refill, and the real peer gets in by honouring
    Retry-After."""
    async with node_context(tmp_path / "genesis") as open_node, \
            node_context(tmp_path / "manual", DARKMATTER_GENESIS="false") as manual:
        for node in (open_node, manual):
            fakes = [RawPeer() for _ in range(200)]
            bodies = [json.dumps(f.connection_request()).encode() for f in fakes]
            statuses: list[int] = []
            url = f"http://127.0.0.1:{node.port}/__darkmatter__/connection_request"
            real = RawPeer()
            real_result: dict = {}

            async def flood(http: httpx.AsyncClient) -> float:
                started = time.monotonic()
                queue = list(bodies)

                async def worker():
                    while queue:
                        body = queue.pop()
                        reply = await http.post(url, content=body, headers={"Content-Type": "application/json"})
                        statuses.append(reply.status_code)
                await asyncio.gather(*(worker() for _ in range(16)))
                return time.monotonic() - started

            async def real_peer(http: httpx.AsyncClient) -> None:
                await asyncio.sleep(0.2)
                started = time.monotonic()
                tries = 0
                while time.monotonic() - started < 30:
                    tries += 1
                    reply = await http.post(url, json=real.connection_request())
                    if reply.status_code == 200:
                        real_result.update(reply.json(), seconds=time.monotonic() - started, tries=tries)
                        return
                    assert reply.status_code == 429, reply.text
                    await asyncio.sleep(min(5.0, float(reply.headers.get("retry-after", "1"))))

            async with httpx.AsyncClient(trust_env=False, timeout=30,
                                         limits=httpx.Limits(max_connections=32)) as http:
                seconds, _ = await asyncio.gather(flood(http), real_peer(http))
            admitted = statuses.count(200)
            assert set(statuses) <= {200, 429}
            assert admitted <= 30 + int(seconds) + 2, f"the flood got {admitted} requests in"
            assert real_result, "the real peer never got in"
            if node is open_node:
                assert real_result["auto_accepted"] is True and real.agent_id in node.connections
                assert len(node.connections) <= admitted + 1
            else:
                assert real_result["auto_accepted"] is False
                assert any(p["from_agent_id"] == real.agent_id for p in node.state["pending_requests"].values())
                assert len(node.state["pending_requests"]) <= admitted + 1
            figure(f"connection_request flood ({'genesis' if node is open_node else 'manual'})",
                   f"{len(statuses)} requests in {seconds:.2f} s ({len(statuses) / seconds:.0f}/s), "
                   f"{admitted} admitted; real peer in after {real_result['seconds']:.1f} s, "
                   f"{real_result['tries']} tries")


async def test_one_peer_cannot_fill_the_inbox(tmp_path):
    async with node_context(tmp_path) as node:
        greedy, polite, third = RawPeer(), RawPeer(), RawPeer()
        for peer in (greedy, polite, third):
            await peer.connect(node)
        statuses = []
        for i in range(40):
            reply = await greedy.post(node, "/__darkmatter__/message", greedy.message(node, f"spam {i}"))
            statuses.append(reply.status_code)
            if reply.status_code == 429:
                assert reply.json()["code"] in ("capacity", "rate_limited")
        held = sum(1 for m in node.state["inbox"] if m["from_agent_id"] == greedy.agent_id)
        assert held == node.config.inbox_max // 2 == statuses.count(200)
        reply = await polite.post(node, "/__darkmatter__/message", polite.message(node, "hello"))
        assert reply.status_code == 200, reply.text
        for i in range(30):
            await polite.post(node, "/__darkmatter__/message", polite.message(node, f"more {i}"))
        # the inbox is full now (25 + 25): everyone gets 429, nobody's messages are lost or replaced
        full = await third.post(node, "/__darkmatter__/message", third.message(node, "late"))
        assert full.status_code == 429 and full.json()["code"] == "capacity"
        assert len(node.state["inbox"]) == node.config.inbox_max


@pytest.mark.slow
async def test_status_keeps_answering_while_writers_hammer_the_node(tmp_path):
    """8 writers flood /message for 6 s while a reader polls /status: the reads go on being answered during
    the flood (none waits for it to end). How fast is the bench's business (``python -m bench --only
    responsive``); the figure printed here is for information."""
    proc = NodeProcess(tmp_path, DARKMATTER_RATE_LIMITS="off", DARKMATTER_INBOX_MAX="100000")
    try:
        status = await proc.start()

        class Remote:
            agent_id = status["agent_id"]
            port = proc.port
        writers = [RawPeer() for _ in range(4)]
        for peer in writers:
            assert (await peer.connect(Remote))["auto_accepted"] is True
        stop = asyncio.Event()
        written = 0
        latencies: list[float] = []

        async def write(peer: RawPeer, http: httpx.AsyncClient) -> None:
            nonlocal written
            while not stop.is_set():
                body = peer.message(Remote, "x" * 2000, metadata={"n": written})
                reply = await http.post(proc.url + "/__darkmatter__/message", json=body)
                assert reply.status_code == 200, reply.text
                written += 1

        async def read(http: httpx.AsyncClient) -> None:
            while not stop.is_set():
                t = time.monotonic()
                reply = await http.get(proc.url + "/__darkmatter__/status")
                latencies.append(time.monotonic() - t)
                assert reply.status_code == 200
                await asyncio.sleep(0.01)

        async with httpx.AsyncClient(trust_env=False, timeout=30) as wh, \
                httpx.AsyncClient(trust_env=False, timeout=30) as rh:
            tasks = [asyncio.create_task(write(p, wh)) for p in writers for _ in range(2)]
            tasks.append(asyncio.create_task(read(rh)))
            await asyncio.sleep(6)
            stop.set()
            await asyncio.gather(*tasks)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        figure("/status under write load", f"{written / 6:.0f} writes/s by 8 writers; status p50 {p50 * 1000:.1f} ms, "
               f"p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms over {len(latencies)} reads")
        assert written > 50
        # generous bounds for "not blocked": a read stuck behind the writes would take the whole 6 s flood
        assert len(latencies) >= 10, f"only {len(latencies)} /status reads were answered during the flood"
        assert max(latencies) < 10, f"a /status read took {max(latencies):.1f} s"
    finally:
        await proc.stop()


@pytest.mark.slow
async def test_memory_stays_bounded_after_1000_maximum_size_requests(tmp_path):
    proc = NodeProcess(tmp_path, DARKMATTER_RATE_LIMITS="off")
    try:
        await proc.start()
        filler = MAX_BODY - len(b'{"content": ""}') - 64
        bodies = {
            "/__darkmatter__/message": json.dumps({"content": "x" * filler}).encode(),
            "/__darkmatter__/connection_request": json.dumps({"from_agent_bio": "é" * (filler // 2)},
                                                             ensure_ascii=False).encode(),
            "/__darkmatter__/webhook/msg-x": json.dumps({"type": "response", "response": [1] * (filler // 3)}).encode(),
            "/__darkmatter__/peer_update": json.dumps({"agent_id": "a" * (filler - 100)}).encode(),
        }
        paths = list(bodies)
        samples = []

        async def batch(http: httpx.AsyncClient, n: int, start: int) -> None:
            queue = list(range(start, start + n))

            async def worker():
                while queue:
                    i = queue.pop()
                    path = paths[i % len(paths)]
                    reply = await http.post(proc.url + path, content=bodies[path],
                                            headers={"Content-Type": "application/json"})
                    assert 400 <= reply.status_code < 500, (path, reply.status_code)
            await asyncio.gather(*(worker() for _ in range(4)))

        started = time.monotonic()
        async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
            await batch(http, 100, 0)
            samples.append(rss_kib(proc.pid))
            for k in range(9):
                await batch(http, 100, 100 * (k + 1))
                samples.append(rss_kib(proc.pid))
        seconds = time.monotonic() - started
        growth = samples[-1] - samples[0]
        figure("memory after 1000 x 1 MiB requests", f"RSS {samples[0] / 1024:.0f} -> {samples[-1] / 1024:.0f} MiB "
               f"(max {max(samples) / 1024:.0f}) in {seconds:.1f} s")
        assert growth < 64 * 1024, f"RSS grew by {growth / 1024:.0f} MiB: {samples}"
        assert (await httpx.AsyncClient(trust_env=False).get(proc.url + "/__darkmatter__/status")).status_code == 200
    finally:
        await proc.stop()


def test_minting_many_rate_limit_keys_never_lifts_the_node_wide_limits():
    """§13.1: per-key buckets are bounded in number, but a flood of fresh keys (claimed agent ids cost
    nothing) must not reset the node-wide buckets — they are what stops a flood of fresh identities."""
    from darkmatter.ratelimit import RateLimiter
    from darkmatter.wire import ProtocolError

    limiter = RateLimiter(True)
    for _ in range(30):
        limiter.check("connection_request_node")
    with pytest.raises(ProtocolError):
        limiter.check("connection_request_node")
    limiter.check("message_peer", "victim")
    for i in range(3 * RateLimiter.MAX_KEYS):
        limiter.check("get_ip", f"id:minted-{i}")
    with pytest.raises(ProtocolError) as info:
        limiter.check("connection_request_node")
    assert info.value.status == 429
    assert len(limiter._buckets) <= RateLimiter.MAX_KEYS  # memory stays bounded
