"""Delivery receipts (docs/protocol.md §5.8): how far a message got at each of its recipients.

Recipient side. When an inbox message is first *surfaced* (pushed to an agent session as a channel
notification, returned by ``darkmatter_wait_for_message``, or listed with its content) or *read* (opened with
``darkmatter_get_message``), :func:`advance` notes it on the inbox entry (``surfaced_at``, ``read_at``) and
queues a signed ``receipt`` webhook update through the outbox (a ``surfaced`` receipt after a short grace, and
not at all when the message was read meanwhile: the ``read`` receipt says both). Receipts go only to a webhook owner known to
speak 0.3 (a 0.2 owner answers 400 to an update type it does not know), never when
``DARKMATTER_RECEIPTS=false``, and never into an outbox that is half full.

Owner side. :func:`check` and :func:`record` are what the webhook handler does with a ``receipt`` update;
:func:`recipient_states` is the furthest state per recipient (``queued``, ``delivered``, ``surfaced``, ``read``,
``responded``, or ``failed``) shown by ``darkmatter_get_sent_message`` and ``darkmatter_list_messages``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from darkmatter.mesh.connections import known_03
from darkmatter.mesh.dispatch import call
from darkmatter.mesh.outbox import append_op
from darkmatter.mesh.transport import SMALL
from darkmatter.wire import ProtocolError, bad, forbidden, now_iso, urls_match, webhook_problem

if TYPE_CHECKING:
    from darkmatter.node import Node

log = logging.getLogger(__name__)

STATES = ("surfaced", "read")
RANK = {"failed": 0, "queued": 1, "delivered": 2, "surfaced": 3, "read": 4, "responded": 5}
MAX_RECEIPTS = 200
PROBE_DELAYS = (0.5, 1.0, 2.0, 4.0)  # pauses between asking a webhook owner that cannot tell yet
SURFACED_GRACE = 0.25  # seconds a "surfaced" receipt waits for the message to be read (then "read" goes alone)
OUTBOX_ROOM = 250  # receipts are advisory: never queued once the outbox (cap 500, §13.2) is half full


# --- recipient side ------------------------------------------------------------------------------------


def advance(node: Node, entry: dict, state: str) -> bool:
    """Note that inbox ``entry`` was surfaced, or read (which implies surfaced), and queue one receipt for the
    furthest new state. Returns whether anything changed."""
    now = now_iso()
    fresh = None
    path = ["inbox", {"message_id": entry["message_id"]}]
    ops = []
    if entry.get("surfaced_at") is None:
        entry["surfaced_at"] = now
        fresh = "surfaced"
        ops.append(("set", [*path, "surfaced_at"], now))
    if state == "read" and entry.get("read_at") is None:
        entry["read_at"] = now
        fresh = "read"
        ops.append(("set", [*path, "read_at"], now))
    if fresh is None:
        return False
    node.save_soon(ops)  # an entry already removed (answered meanwhile) makes these no-ops at replay
    if node.config.receipts:
        node.spawn(_send(node, entry, fresh), name="receipt")
    node.spawn(node.emit("dm_on_message_seen", message=dict(entry), state=fresh), name="message-seen")
    return True


async def _send(node: Node, entry: dict, state: str) -> None:
    message_id = entry["message_id"]
    webhook = entry.get("webhook")
    if webhook_problem(webhook, message_id):
        return
    if state == "surfaced":
        # NOTE: a message surfaced (pushed as it arrived) is often read moments later; a receipt carries the
        # furthest state reached when it goes, as advance() does for a message read before it ever surfaced,
        # so one "read" receipt then stands for both instead of two webhook posts the owner must persist.
        await asyncio.sleep(SURFACED_GRACE)
        if entry.get("read_at") is not None:
            return  # advance(..., "read") queued the read receipt
    verdict = await owner_protocol(node, entry)
    for delay in PROBE_DELAYS:
        if verdict is not None:
            break
        await asyncio.sleep(delay)
        verdict = await owner_protocol(node, entry)
    if verdict != "0.3":
        return
    outbox = node.outbox
    if outbox is None or len(outbox.entries) >= OUTBOX_ROOM:
        log.info("receipt for %s not sent: the outbox is busy", message_id)
        return
    try:
        queued = outbox.add("webhook_update", {"type": "receipt", "agent_id": node.agent_id, "state": state},
                            url=webhook, message_id=message_id)
    except ProtocolError as exc:
        log.info("receipt for %s not sent: %s", message_id, exc.error)
        return
    node.save_soon([append_op(queued)])


async def owner_protocol(node: Node, entry: dict) -> str | None:
    """``"0.3"`` or ``"0.2"``: the protocol of the entry's webhook owner, remembered on the entry once known;
    None while it cannot be told yet.

    A message that came straight from its originator has the sender's URL as its webhook base, and the
    connection says which protocol the sender speaks. Otherwise (a forwarded message) the webhook's GET reply
    says it: only 0.3 owners report ``origin_agent_id`` (§5.7). Until that reply shows this node on the route
    (the forwarder's ``forwarded`` update may still be on its way), the answer is None."""
    known = entry.get("owner_protocol")
    if known in ("0.2", "0.3"):
        return known
    webhook = entry["webhook"]
    conn = node.connections.get(entry.get("from_agent_id") or "")
    if conn is not None and urls_match(webhook.split("/__darkmatter__/", 1)[0], conn.get("agent_url")):
        verdict = "0.3" if known_03(conn) else "0.2"
    else:
        reply = await call(node, "GET", webhook, timeout=10.0, max_bytes=SMALL, strict=True)
        body = reply.body if reply.status == 200 and isinstance(reply.body, dict) else None
        if body is None:
            return None
        if not isinstance(body.get("origin_agent_id"), str):
            verdict = "0.2"
        elif node.agent_id in _list(body.get("routed_to")) or any(
                isinstance(u, dict) and u.get("type") == "forwarded" and u.get("target_agent_id") == node.agent_id
                for u in _list(body.get("updates"))):
            verdict = "0.3"
        else:
            return None
    entry["owner_protocol"] = verdict
    node.save_soon([("set", ["inbox", {"message_id": entry["message_id"]}, "owner_protocol"], verdict)])
    return verdict


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


# --- owner side -----------------------------------------------------------------------------------------


def route(sent: dict) -> set[str]:
    """§5.6 route of a sent message: the recipients it was addressed to (``routed_to`` and those whose
    delivery is still in flight: a recipient may surface or answer a message before its 200 reached this
    node's outbox) plus, recursively, the targets of ``forwarded`` updates from route members. Every webhook
    update (forwarded, expired, response, receipt) must come from a member."""
    members = set(sent.get("routed_to") or ()) | set(sent.get("deliveries") or {})
    edges = [(u.get("agent_id"), u.get("target_agent_id")) for u in sent.get("updates") or ()
             if u.get("type") == "forwarded" and u.get("target_agent_id")]
    grew = True
    while grew:
        grew = False
        for source, target in edges:
            if source in members and target not in members:
                members.add(target)
                grew = True
    return members


def check(sent: dict, body: dict, agent_id: str) -> str:
    """Validate a ``receipt`` update before its signature is checked; return its state (the signed text)."""
    state = body.get("state")
    if state not in STATES:
        raise bad("Field 'state' must be 'surfaced' or 'read'")
    return state


async def record(node: Node, sent: dict, agent_id: str, state: str, sent_at: str | None, verified: bool) -> dict:
    """Record a checked ``receipt`` once per (agent_id, state) and persist it before answering."""
    if not verified:
        raise forbidden("Signature required: receipts are signed (docs/protocol.md §5.8)", "signature_required")
    status = sent.get("status", "active")
    receipts = sent.get("receipts")
    created = not isinstance(receipts, list)
    if created:
        receipts = sent["receipts"] = []
    if any(r.get("agent_id") == agent_id and r.get("state") == state for r in receipts):
        return {"success": True, "duplicate": True, "recorded": "receipt", "verified": True, "status": status}
    if len(receipts) >= MAX_RECEIPTS:
        raise ProtocolError(429, "capacity", "Too many receipts for this message")
    item = {"agent_id": agent_id, "state": state, "timestamp": now_iso(), "sent_at": sent_at, "verified": True}
    receipts.append(item)
    path = ["sent_messages", sent["message_id"], "receipts"]
    try:
        await node.save([("set", path, list(receipts))] if created else [("append", path, item)])
    except OSError:
        receipts.remove(item)
        if created:
            sent.pop("receipts", None)
        raise
    node.changed()
    return {"success": True, "recorded": "receipt", "verified": True, "status": status}


def recipient_states(sent: dict) -> dict[str, str]:
    """The furthest state each recipient of a sent message reached."""
    states = {agent_id: d.get("state") or "queued" for agent_id, d in (sent.get("deliveries") or {}).items()}
    for update in sent.get("updates") or ():
        if update.get("type") == "forwarded" and update.get("target_agent_id"):
            states.setdefault(update["target_agent_id"], "delivered")
    members = route(sent)

    def bump(agent_id: Any, state: str) -> None:
        if agent_id in members and RANK[state] > RANK.get(states.get(agent_id), -1):
            states[agent_id] = state

    for receipt in sent.get("receipts") or ():
        if receipt.get("state") in STATES:
            bump(receipt.get("agent_id"), receipt["state"])
    for response in sent.get("responses") or ():
        bump(response.get("agent_id"), "responded")
    return states


def unread_sent(node: Node) -> int:
    """Active sent messages that no recipient has read (or answered) yet, not counting ones that failed
    everywhere: the live status shows this number."""
    count = 0
    for sent in node.state.get("sent_messages", {}).values():
        if sent.get("status", "active") != "active":
            continue
        states = recipient_states(sent).values()
        if states and not any(RANK[s] >= RANK["read"] for s in states) and any(s != "failed" for s in states):
            count += 1
    return count
