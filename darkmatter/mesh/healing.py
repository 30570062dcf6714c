"""Mesh healing (docs/protocol.md §6): URL verification, peer_lookup recovery, peer_update broadcast."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from typing import TYPE_CHECKING

from darkmatter.identity import peer_update_string, v2_string, verify
from darkmatter.mesh.connections import known_03
from darkmatter.mesh.dispatch import call
from darkmatter.mesh.transport import SMALL
from darkmatter.wire import endpoint, is_fresh, is_self_certifying, now_iso, origin_key, try_normalize, urls_match

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
    """§6.1: ``ok`` when the node at `url` proves possession of K(agent_id); else ``unreachable`` or ``mismatch``.

    A copy of X's public well-known document proves nothing, so `url` must sign a fresh nonce with X's key
    (``POST /__darkmatter__/challenge``). Only a peer known to speak 0.2 (a UUID id never announced as 0.3,
    whose node has no challenge route) falls back to its well-known document: the limit of mixed networks."""
    key = node.key_of(agent_id)
    base = try_normalize(url)
    if key is None or base is None:
        return "mismatch"
    nonce = secrets.token_hex(32)
    reply = await call(node, "POST", endpoint(base, "challenge"), body={
        "agent_id": agent_id, "from_agent_id": node.agent_id, "nonce": nonce}, timeout=5.0, max_bytes=SMALL,
        strict=True)
    if reply.status == 200 and isinstance(reply.body, dict):
        return "ok" if proves_possession(node, reply.body, agent_id, key, nonce, base) else "mismatch"
    if reply.status == 404 and _may_fall_back(node, agent_id):
        doc = await fetch_well_known(node, base)
        if doc is None:
            return "unreachable"
        if doc.get("agent_id") != agent_id or str(doc.get("public_key_hex", "")).lower() != key:
            return "mismatch"
        return "ok"
    if reply.status is None or reply.classification == "transient":
        return "unreachable"
    return "mismatch"


def proves_possession(node: Node, answer: dict, agent_id: str, key: str, nonce: str, base: str) -> bool:
    """§6.1 step 3: signed under K(X) over this nonce, fresh, and naming the URL that was asked."""
    url, timestamp, signature = answer.get("url"), answer.get("timestamp"), answer.get("signature_v2_hex")
    if answer.get("agent_id") != agent_id or not isinstance(url, str) or not isinstance(signature, str):
        return False
    if not urls_match(url, base) or not is_fresh(timestamp):
        return False
    return verify(key, v2_string("challenge", nonce, agent_id, node.agent_id, url, timestamp), signature)


def _may_fall_back(node: Node, agent_id: str) -> bool:
    conn = node.connections.get(agent_id)
    return conn is not None and not is_self_certifying(agent_id) and not known_03(conn)


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
        if task.cancelled() or task.exception() is not None:
            continue  # one broken answer never aborts the recovery (§2.1)
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
