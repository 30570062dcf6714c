"""Admission without lock-out (docs/protocol.md §13.2).

A flood of connection requests from fresh identities must never keep a real peer out:

* **Connections.** On a genesis node, a connection it auto-accepted that has exchanged no message yet (none
  received from it, none delivered to it) is *probationary*. When the table is full and a new request
  arrives, the oldest probationary connection gives way: it is removed (its queued deliveries fail, §4.6), a
  notice is recorded, and it gets a signed ``disconnect``. Connections the owner chose (outbound, or accepted
  by hand) and every peer that has exchanged a message are never evicted. So a flood only ever displaces
  itself, and a real peer stays once it has said something; the §13.1 buckets bound how fast strangers come.
* **Pending requests.** When the 50 slots are full, the oldest request from a stranger that no one vouches
  for gives way to the new one. A requester is vouched for when the owner keeps an impression of it
  (``darkmatter_set_impression``): the owner has said something about that agent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from darkmatter.mesh.connections import add_notice, drop_connection
from darkmatter.mesh.dispatch import call
from darkmatter.mesh.transport import SMALL
from darkmatter.wire import endpoint, now_iso

if TYPE_CHECKING:
    from darkmatter.node import Node

log = logging.getLogger(__name__)


def probationary(conn: dict) -> bool:
    return bool(conn.get("auto_accepted")) and not conn.get("messages_received") and not conn.get("messages_sent")


def evict_probationary(node: Node, newcomer: str) -> dict | None:
    """Remove the oldest probationary connection to make room for ``newcomer``; return it (None when there is
    none). The caller persists; :func:`say_goodbye` tells the evicted peer."""
    busy = {e.get("target_agent_id") for e in node.state.get("outbox") or ()}  # the owner is talking to it
    candidates = [c for c in node.connections.values() if probationary(c) and c["agent_id"] not in busy]
    if not candidates:
        return None
    victim = min(candidates, key=lambda c: c.get("connected_at") or "")
    drop_connection(node, victim["agent_id"])
    add_notice(node, "evicted", victim["agent_id"], "Probationary connection (auto-accepted, no message exchanged) "
                                                   f"gave way to a new request from {newcomer[:16]} (table full)")
    log.info("connection %s evicted (probationary) to admit %s", victim["agent_id"][:16], newcomer[:16])
    return victim


async def say_goodbye(node: Node, victim: dict) -> None:
    """One signed ``disconnect`` (§4.6) to an evicted peer; failures are ignored, as for the tool."""
    ts = now_iso()
    body = {"agent_id": node.agent_id, "peer_agent_id": victim["agent_id"], "timestamp": ts,
            "reason": "connection table full; probationary connections give way (docs/protocol.md §13.2)",
            "signature_v2_hex": node.sign_v2("disconnect", node.agent_id, victim["agent_id"], ts)}
    await call(node, "POST", endpoint(victim["agent_url"], "disconnect"), body=body, timeout=10.0, max_bytes=SMALL)


def vouched(node: Node, request: dict) -> bool:
    return request.get("from_agent_id") in (node.state.get("impressions") or {})


def make_room_for_request(node: Node) -> str | None:
    """The id of the pending request that gives way (already removed), or None when every one is vouched for."""
    pending = node.state["pending_requests"]
    strangers = [(entry.get("requested_at") or "", request_id) for request_id, entry in pending.items()
                 if not vouched(node, entry)]
    if not strangers:
        return None
    _, request_id = min(strangers)
    del pending[request_id]
    return request_id
