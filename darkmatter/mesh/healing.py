"""Mesh healing (docs/protocol.md §6): URL verification, peer_lookup recovery, peer_update broadcast."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from darkmatter.identity import peer_update_string
from darkmatter.mesh.dispatch import call
from darkmatter.mesh.transport import SMALL
from darkmatter.wire import endpoint, now_iso, origin_key, try_normalize

if TYPE_CHECKING:
    from darkmatter.node import Node

log = logging.getLogger(__name__)

RECOVERY_INTERVAL = 60.0


async def fetch_well_known(node: Node, base: str, *, strict: bool = True) -> dict | None:
    """GET {base}/.well-known/darkmatter.json (5 s, no redirects, ≤ 64 KiB); the document or None."""
    reply = await call(node, "GET", base + "/.well-known/darkmatter.json", timeout=5.0, max_bytes=SMALL,
                       strict=strict)
    if reply.status == 200 and isinstance(reply.body, dict) and reply.body.get("darkmatter") is True:
        return reply.body
    return None


async def check_url(node: Node, agent_id: str, url: str) -> str:
    """§6.1: ``ok`` when `url` serves `agent_id` with K(agent_id); else ``unreachable`` or ``mismatch``."""
    key = node.key_of(agent_id)
    if key is None:
        return "mismatch"
    doc = await fetch_well_known(node, url)
    if doc is None:
        return "unreachable"
    if doc.get("agent_id") != agent_id or str(doc.get("public_key_hex", "")).lower() != key:
        return "mismatch"
    return "ok"


async def verify_url(node: Node, agent_id: str, url: str) -> bool:
    return await check_url(node, agent_id, url) == "ok"


async def recover(node: Node, agent_id: str) -> bool:
    """§6.2: ask every other connection where `agent_id` went; adopt the first verified answer."""
    conn = node.connections.get(agent_id)
    if conn is None or node.key_of(agent_id) is None:
        return False
    now = time.monotonic()
    last = node.recovery_at
    if now - last.get(agent_id, -RECOVERY_INTERVAL) < RECOVERY_INTERVAL:
        return False
    last[agent_id] = now
    others = [c for c in node.connections.values() if c["agent_id"] != agent_id][:50]
    if not others:
        return False
    path = "/__darkmatter__/peer_lookup/" + agent_id

    async def ask(peer: dict):
        return await call(node, "GET", endpoint(peer["agent_url"], "peer_lookup", agent_id), timeout=5.0,
                          max_bytes=SMALL, headers=node.signed_get_headers(path, peer["agent_id"]))

    tasks = [asyncio.ensure_future(ask(p)) for p in others]
    done, pending = await asyncio.wait(tasks, timeout=6.0)
    for task in pending:
        task.cancel()
    votes: Counter[str] = Counter()
    current = conn["agent_url"]
    for task in done:
        reply = task.result()
        if reply.status == 200 and isinstance(reply.body, dict) and reply.body.get("agent_id") == agent_id:
            url = try_normalize(reply.body.get("url"))
            if url and origin_key(url) != origin_key(current):
                votes[url] += 1
    for url, _ in votes.most_common():
        if await verify_url(node, agent_id, url):
            conn["agent_url"] = url
            conn["health_failures"] = 0
            log.info("connection %s moved to %s (verified via peer_lookup)", agent_id[:12], url)
            await node.save()
            await node.emit("dm_on_connection_changed", agent_id=agent_id, event="url_changed")
            node.outbox.kick()
            return True
    return False


async def broadcast_peer_update(node: Node) -> dict[str, str]:
    """§6.3 sender: tell every connection our new base URL; retry a transient failure once after 30 s."""
    new_url = node.base_url
    for conn in node.connections.values():
        conn["self_url"] = new_url
    node.state["last_public_url"] = new_url
    node.save_soon()

    async def send(conn: dict, retry: bool = True) -> str:
        ts = now_iso()
        body = {"agent_id": node.agent_id, "new_url": new_url, "public_key_hex": node.public_key_hex,
                "timestamp": ts, "signature": node.sign(peer_update_string(node.agent_id, new_url, ts))}
        reply = await call(node, "POST", endpoint(conn["agent_url"], "peer_update"), body=body, timeout=5.0,
                           max_bytes=SMALL)
        if reply.classification == "transient" and retry:
            await asyncio.sleep(30)
            if node.base_url != new_url:
                return "superseded by a newer URL"  # a later broadcast carries it; never resend a stale one
            return await send(conn, retry=False)
        return "delivered" if reply.ok else reply.describe()

    conns = list(node.connections.values())
    results = await asyncio.gather(*(send(c) for c in conns))
    return {c["agent_id"]: r for c, r in zip(conns, results)}
