"""Per-hop acceptance: signed POST /message → queued, DarkMatter vs the bare route, empty and full stores.

Three servers, each its own process on loopback, loaded by a fourth (``bench.loadgen``):

* ``bare``: ``bench.bare_server`` (Starlette + hypercorn, one Ed25519 verification);
* ``empty``: ``darkmatter run`` (http, plugin ``http_transport``, ``DARKMATTER_RATE_LIMITS=off``), holding
  only the sending peers as connections;
* ``full``: the same node started from a state that is full: ``FULL_INBOX`` inbox entries of 1 KiB each
  plus the sent-message store at its cap (100 messages of 64 KiB, with their delivery records), and as many
  remembered message ids as inbox entries (about 12 MB of state).

Senders are ``PEERS`` distinct identities (RawPeer-style, each a connection of the node) sending distinct
message ids round-robin, one v2 signature each; the inbox cap is raised so nothing is refused. Each repeat
starts every server afresh from the same template (so every repeat sees the same store sizes) and runs
concurrency 1, 16 and 64; the order of the three servers rotates between repeats.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from pathlib import Path

from bench.common import (PYTHON, Child, JsonLineChild, child_env, cpu_seconds, dumps, free_port, new_identity,
                          ratios, spread, wait_http)

PEERS = 16
FULL_INBOX = 5000
INBOX_MAX = 20000
SENT_FULL = 100
CONCURRENCY = (1, 16, 64)


def settings(quick: bool) -> dict:
    if quick:
        return {"repeats": 2, "count": {1: 40, 16: 200, 64: 200}, "warmup": 20, "full_inbox": 1000}
    return {"repeats": 5, "count": {1: 300, 16: 2000, 64: 2000}, "warmup": 100, "full_inbox": FULL_INBOX}


def node_env(home: Path, state_file: Path, port: int) -> dict[str, str]:
    return child_env(home, DARKMATTER_TRANSPORT="http", DARKMATTER_PORT=str(port),
                     DARKMATTER_STATE_FILE=str(state_file), DARKMATTER_PLUGINS="http_transport",
                     DARKMATTER_RATE_LIMITS="off", DARKMATTER_INBOX_MAX=str(INBOX_MAX),
                     DARKMATTER_HEALTH_INTERVAL="3600")


async def make_template(work: Path, port: int, peers: list[dict]) -> Path:
    """Start a node in this process on `port`, connect every peer to it, stop it: its state file."""
    from darkmatter.identity import Identity, v2_string
    from darkmatter.testing import make_node
    from darkmatter.wire import now_iso

    from bench.common import RawHttp

    home = work / "template"
    state = home / "state.json"
    env = {k: v for k, v in node_env(home, state, port).items() if k.startswith("DARKMATTER_")}
    env.pop("DARKMATTER_PORT", None)
    node = make_node(home, port=port, **env)
    async with node:
        async with RawHttp("127.0.0.1", port) as http:
            for peer in peers:
                ident = Identity.from_private_hex(peer["private_key_hex"])
                url = "http://127.0.0.1:9"
                ts = now_iso()
                body = {"from_agent_id": ident.public_key_hex, "from_agent_url": url, "from_agent_bio": "bench peer",
                        "from_agent_display_name": "bench", "protocol_version": "0.3",
                        "from_agent_public_key_hex": ident.public_key_hex, "timestamp": ts}
                body["signature_v2_hex"] = ident.sign(v2_string("connection_request", ident.public_key_hex, url,
                                                                ident.public_key_hex, ts))
                status, answer = await http.request("POST", "/__darkmatter__/connection_request", dumps(body))
                if status != 200 or not json.loads(answer).get("auto_accepted"):
                    raise RuntimeError(f"bench peer not accepted: {status} {answer[:200]!r}")
        assert len(node.connections) == len(peers)
    return state


def fill(template: Path, target: Path, peers: list[dict], inbox: int) -> None:
    """Write a full copy of the template state: `inbox` inbox entries and a full sent store."""
    from darkmatter.wire import now_iso

    state = json.loads(template.read_text())
    now = now_iso()
    stamp = int(time.time())
    for i in range(inbox):
        peer = peers[i % len(peers)]["agent_id"]
        mid = f"msg-fill{i:06d}{secrets.token_hex(4)}"
        state["inbox"].append({
            "message_id": mid, "content": ("inbox filler %d " % i).ljust(1024, "."),
            "webhook": f"http://127.0.0.1:9/__darkmatter__/webhook/{mid}", "hops_remaining": 9,
            "from_agent_id": peer, "metadata": {}, "received_at": now, "verified": True, "signature_version": 2,
            "forwarded_to": [], "transport": "http"})
        state["seen_message_ids"][mid] = stamp
    for i in range(SENT_FULL):
        mid = f"msg-sent{i:06d}{secrets.token_hex(4)}"
        deliveries = {p["agent_id"]: {"state": "delivered", "attempts": 1, "last_status": 200, "last_error": None,
                                      "transport": "http", "updated_at": now} for p in peers[:4]}
        state["sent_messages"][mid] = {
            "message_id": mid, "content": ("sent filler %d " % i).ljust(65536, "."), "status": "active",
            "initial_hops": 10, "routed_to": [p["agent_id"] for p in peers[:4]], "created_at": now, "updates": [],
            "response": None, "webhook": f"http://127.0.0.1:1/__darkmatter__/webhook/{mid}", "metadata": {},
            "responses": [], "deliveries": deliveries}
    state.pop("journal_seq", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(state, separators=(",", ":")))
    target.chmod(0o600)


def fsync_probe(directory: Path, count: int = 200) -> float:
    """Median seconds to append ~900 bytes to a file and fsync it (what one journal record costs here)."""
    import os
    import statistics

    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            os.write(fd, b"x" * 900 + b"\n")
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times)


async def run(ctx) -> dict:
    cfg = settings(ctx.quick)
    work = ctx.work / "perhop"
    work.mkdir(parents=True, exist_ok=True)
    peers = [new_identity() for _ in range(PEERS)]
    dm_port, bare_port = free_port(), free_port()
    template = await make_template(work, dm_port, peers)
    agent_id = json.loads(template.read_text())["agent_id"]
    full_template = work / "full-template.json"
    fill(template, full_template, peers, cfg["full_inbox"])
    state_bytes = {"empty": template.stat().st_size, "full": full_template.stat().st_size}

    loadgen = JsonLineChild([PYTHON, "-m", "bench.loadgen"], child_env(work), log=ctx.log("loadgen"))
    results: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in CONCURRENCY} for k in ("bare", "empty", "full")}
    order = ["bare", "empty", "full"]
    fsync_s: list[float] = []
    try:
        for repeat in range(cfg["repeats"]):
            fsync_s.append(await asyncio.to_thread(fsync_probe, work))
            for kind in order[repeat % 3:] + order[:repeat % 3]:
                if kind == "bare":
                    child = Child([PYTHON, "-m", "bench.bare_server", "--port", str(bare_port), "--agent-id", agent_id],
                                  child_env(work), log=ctx.log("bare"))
                    port = bare_port
                else:
                    home = work / f"run-{repeat}-{kind}"
                    home.mkdir(parents=True, exist_ok=True)
                    state = home / "state.json"
                    shutil.copyfile(template if kind == "empty" else full_template, state)
                    state.chmod(0o600)
                    child = Child([PYTHON, "-m", "darkmatter", "run"], node_env(home, state, dm_port),
                                  log=ctx.log(f"node-{kind}"))
                    port = dm_port
                try:
                    await wait_http(port, child=child, timeout=60)
                    for c in CONCURRENCY:
                        job = {"job": "load", "port": port, "peers": peers, "to_id": agent_id, "concurrency": c,
                               "count": cfg["warmup"]}
                        await loadgen.call(job, timeout=600)  # warm-up, not kept
                        cpu_before = cpu_seconds(child.pid)
                        result = await loadgen.call({**job, "count": cfg["count"][c]}, timeout=600)
                        cpu_after = cpu_seconds(child.pid)
                        if result["ok"] != result["count"]:
                            raise RuntimeError(f"{kind} c={c}: not every request was accepted: {result}")
                        result["server_cpu_us"] = round((cpu_after - cpu_before) / result["count"] * 1e6, 1)
                        results[kind][c].append(result)
                finally:
                    child.stop()
                    if kind != "bare":
                        shutil.rmtree(work / f"run-{repeat}-{kind}", ignore_errors=True)
    finally:
        try:
            await loadgen.call({"job": "quit"}, timeout=10)
        except Exception:  # noqa: BLE001
            pass
        loadgen.stop()

    figures: dict = {"state_bytes": state_bytes, "peers": PEERS, "full_inbox": cfg["full_inbox"],
                     "sent_messages_full": SENT_FULL, "sent_content_bytes": 65536, "counts": cfg["count"],
                     "repeats": cfg["repeats"], "by_concurrency": {},
                     "fsync_append_ms": spread(t * 1000 for t in fsync_s)}
    rows = []
    for c in CONCURRENCY:
        fig = {}
        for kind in ("bare", "empty", "full"):
            runs = results[kind][c]
            fig[kind] = {"p50_ms": spread(r["p50_ms"] for r in runs), "p99_ms": spread(r["p99_ms"] for r in runs),
                         "throughput_rps": spread((r["throughput_rps"] for r in runs), 1),
                         "server_cpu_us_per_msg": spread((r["server_cpu_us"] for r in runs), 1)}
        bare = results["bare"][c]
        for kind in ("empty", "full"):
            runs = results[kind][c]
            fig[kind]["p50_ratio"] = ratios([r["p50_ms"] for r in runs], [b["p50_ms"] for b in bare])
            fig[kind]["p99_ratio"] = ratios([r["p99_ms"] for r in runs], [b["p99_ms"] for b in bare])
            fig[kind]["throughput_ratio"] = ratios([r["throughput_rps"] for r in runs], [b["throughput_rps"] for b in bare])
            fig[kind]["cpu_ratio"] = ratios([r["server_cpu_us"] for r in runs], [b["server_cpu_us"] for b in bare])
        fig["full_over_empty_throughput"] = ratios([r["throughput_rps"] for r in results["full"][c]],
                                                   [r["throughput_rps"] for r in results["empty"][c]])
        fig["full_over_empty_p50"] = ratios([r["p50_ms"] for r in results["full"][c]],
                                            [r["p50_ms"] for r in results["empty"][c]])
        figures["by_concurrency"][str(c)] = fig
        for kind in ("empty", "full"):
            label = "node" if kind == "empty" else "node, full stores"
            rows.append((f"per-hop c={c}", f"p50 latency ms ({label})", fig[kind]["p50_ms"], fig["bare"]["p50_ms"],
                         fig[kind]["p50_ratio"], "<= 2x" if c == 1 and kind == "empty" else ""))
            rows.append((f"per-hop c={c}", f"p99 latency ms ({label})", fig[kind]["p99_ms"], fig["bare"]["p99_ms"],
                         fig[kind]["p99_ratio"], ""))
            rows.append((f"per-hop c={c}", f"throughput req/s ({label})", fig[kind]["throughput_rps"],
                         fig["bare"]["throughput_rps"], fig[kind]["throughput_ratio"],
                         ">= 0.8x" if c == 16 and kind == "empty" else ""))
            rows.append((f"per-hop c={c}", f"server CPU us/msg ({label})", fig[kind]["server_cpu_us_per_msg"],
                         fig["bare"]["server_cpu_us_per_msg"], fig[kind]["cpu_ratio"], ""))
        rows.append((f"per-hop c={c}", "throughput full / empty", None, None, fig["full_over_empty_throughput"],
                     "0.8-1.2x" if c == 16 else ""))
    rows.append(("per-hop", "fsync of one small append, ms (durability floor)", figures["fsync_append_ms"], None,
                 None, ""))
    c1, c16 = figures["by_concurrency"]["1"], figures["by_concurrency"]["16"]
    figures["targets"] = {
        "p50_le_2x_bare": _le(c1["empty"]["p50_ratio"], 2.0),
        "throughput_ge_0_8x_bare_c16": _ge(c16["empty"]["throughput_ratio"], 0.8),
        "flat_with_full_stores_c16": _within(c16["full_over_empty_throughput"], 0.8, 1.2),
    }
    return {"figures": figures, "rows": rows}


def _le(s: dict, limit: float) -> bool | None:
    return None if s["median"] is None else s["median"] <= limit


def _ge(s: dict, limit: float) -> bool | None:
    return None if s["median"] is None else s["median"] >= limit


def _within(s: dict, lo: float, hi: float) -> bool | None:
    return None if s["median"] is None else lo <= s["median"] <= hi


if __name__ == "__main__":  # pragma: no cover - use `python -m bench --only perhop`
    raise SystemExit("run: .venv/bin/python -m bench --only perhop")
