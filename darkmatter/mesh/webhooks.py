"""Webhooks on the originator (docs/protocol.md §5.6, §5.7): the updates a message's route posts
(``forwarded``, ``expired``, ``response``, §5.8 ``receipt``) and the status a GET shows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from darkmatter.identity import v1_string, v2_webhook_update
from darkmatter.mesh import receipts
from darkmatter.mesh.checks import check_signed, optional_key, optional_sig, rate_key
from darkmatter.mesh.connections import HOPS_CAP, known_03, persist
from darkmatter.mesh.transport import Caller
from darkmatter.wire import (MAX_NOTE, ProtocolError, bad, check_content, check_id, check_message_id, check_metadata,
                             forbidden, get_str, h, is_self_certifying, now_iso, require)

if TYPE_CHECKING:
    from darkmatter.node import Node

MAX_UPDATES = 200
MAX_RESPONSES = 50
MAX_UNVERIFIED_RESPONSES = 10  # §5.6: their own cap, so unverified answers never crowd out a verified one
MAX_UNVERIFIED_UPDATES = 20  # the same for unsigned (0.2) forwarded/expired updates


def _sent(node: Node, message_id: str) -> dict:
    check_message_id(message_id)
    sent = node.state["sent_messages"].get(message_id)
    if sent is None:
        raise ProtocolError(404, "unknown_message", f"No sent message with ID '{message_id}'")
    return sent


async def webhook_post(node: Node, message_id: str, body: dict, caller: Caller) -> dict:
    key, scale = rate_key(caller, body.get("agent_id"))
    node.rate.check("webhook_ip", key, scale)
    sent = _sent(node, message_id)
    update_type = body.get("type")
    if update_type not in ("forwarded", "expired", "response", "receipt"):
        raise bad(f"Unknown update type: '{str(update_type)[:64]}'")
    require(body, "agent_id")
    agent_id = check_id(body["agent_id"], "agent_id")
    text = receipts.check(sent, body, agent_id) if update_type == "receipt" else None  # §5.8: state is the text
    target = body.get("target_agent_id")
    if target not in (None, ""):
        target = check_id(target, "target_agent_id")
    note = get_str(body, "note", max_len=MAX_NOTE)
    metadata: dict = {}
    if update_type == "response":
        if "response" not in body or body["response"] is None:
            raise ProtocolError(400, "missing_fields", "Missing required fields: response")
        text = check_content(body["response"], "response")
        metadata = check_metadata(body.get("metadata"))
    timestamp = get_str(body, "timestamp", max_len=64)
    presented = optional_key(body, "from_public_key_hex")
    sig2 = optional_sig(body)
    sig1 = optional_sig(body, "signature_hex")
    # §5.6 step 2: a signature proves who wrote an update, not that they ever held the message.
    if agent_id not in receipts.route(sent):
        raise forbidden("Not on this message's route", "not_on_route")
    key = node.key_of(agent_id)
    verified = False
    if presented is not None and key is not None and presented != key:
        raise forbidden("Public key mismatch", "key_mismatch")
    if sig2 is not None and key is not None:
        check_signed(key, v2_webhook_update(message_id, update_type, agent_id, target, timestamp,
                                            text if update_type in ("response", "receipt") else note, metadata),
                     sig2, timestamp)
        verified = True
    elif update_type == "response" and sig1 is not None and key is not None:
        check_signed(key, v1_string(agent_id, message_id, timestamp, text), sig1, timestamp)
        verified = True
    elif is_self_certifying(agent_id) or known_03(node.connections.get(agent_id)):
        raise forbidden("Signature required", "signature_required")

    if update_type == "receipt":
        return await receipts.record(node, sent, agent_id, text, timestamp, verified)
    status = sent.get("status", "active")
    if update_type == "response":
        digest = h(text)
        if any(r.get("agent_id") == agent_id and h(r.get("response") or "") == digest for r in sent["responses"]):
            return {"success": True, "duplicate": True, "recorded": "response", "verified": verified,
                    "status": status}
        # §5.6 caps: unverified responses have their own small cap, so they never crowd out a verified one
        cap, label = (MAX_RESPONSES, "verified") if verified else (MAX_UNVERIFIED_RESPONSES, "unverified")
        if sum(1 for r in sent["responses"] if bool(r.get("verified")) == verified) >= cap:
            raise ProtocolError(429, "capacity", f"Too many {label} responses for this message")
        after_expiry = status == "expired"
        record = {"agent_id": agent_id, "response": text, "metadata": metadata, "timestamp": now_iso(),
                  "sent_at": timestamp, "verified": verified, "after_expiry": after_expiry}
        sent["responses"].append(record)
        live = [r for r in sent["responses"] if not r.get("after_expiry")]
        sent["response"] = next((r for r in live if r.get("verified")), None) or (live[0] if live else None)
        # an unverified response marks the message responded only while no verified one exists
        if not after_expiry and status == "active" and (verified or not any(
                r.get("verified") for r in sent["responses"] if r is not record)):
            sent["status"] = "responded"
        conn = node.connections.get(agent_id)
        if conn is not None and verified:
            conn["health_failures"] = 0

        def undo_response() -> None:
            if record in sent["responses"]:
                sent["responses"].remove(record)
            live_now = [r for r in sent["responses"] if not r.get("after_expiry")]
            sent["response"] = next((r for r in live_now if r.get("verified")), None) or (
                live_now[0] if live_now else None)
            sent["status"] = status
        path = ["sent_messages", message_id]
        ops = [("append", [*path, "responses"], record), ("set", [*path, "response"], sent["response"]),
               ("set", [*path, "status"], sent["status"])]
        if conn is not None and verified:
            ops.append(("set", ["connections", agent_id, "health_failures"], 0))
        await persist(node, undo_response, ops)
        await node.emit("dm_on_response_received", sent_message=sent, response=record)
    else:
        for u in sent["updates"]:
            same = u.get("type") == update_type and u.get("agent_id") == agent_id
            if same and (update_type == "expired" or u.get("target_agent_id") == target):
                return {"success": True, "duplicate": True, "recorded": update_type, "verified": verified,
                        "status": status}
        cap, label = (MAX_UPDATES, "") if verified else (MAX_UNVERIFIED_UPDATES, "unverified ")
        if sum(1 for u in sent["updates"] if bool(u.get("verified")) == verified) >= cap:
            raise ProtocolError(429, "capacity", f"Too many {label}updates for this message")
        record = {"type": update_type, "agent_id": agent_id, "note": note, "timestamp": now_iso(),
                  "sent_at": timestamp, "verified": verified}
        if update_type == "forwarded":
            record["target_agent_id"] = target
        sent["updates"].append(record)
        await persist(node, lambda: record in sent["updates"] and sent["updates"].remove(record),
                      [("append", ["sent_messages", message_id, "updates"], record)])
        node.changed()
    return {"success": True, "recorded": update_type, "verified": verified, "status": sent["status"]}


def hops_remaining(sent: dict) -> int:
    """§5.7: initial hops minus the longest recorded forwarding chain."""
    initial = int(sent.get("initial_hops") or 0)
    depth = {r: 0 for r in sent.get("routed_to", [])}
    edges = [(u.get("agent_id"), u.get("target_agent_id")) for u in sent.get("updates", [])
             if u.get("type") == "forwarded" and u.get("target_agent_id")]
    for _ in range(min(initial, HOPS_CAP)):
        changed = False
        for x, y in edges:
            d = min(depth.get(x, 0) + 1, initial)
            if d > depth.get(y, -1):
                depth[y] = d
                changed = True
        if not changed:
            break
    return max(0, initial - max(depth.values(), default=0))


def webhook_status(node: Node, sent: dict) -> dict:
    return {"message_id": sent["message_id"], "status": sent.get("status", "active"),
            "initial_hops": sent.get("initial_hops"), "hops_remaining": hops_remaining(sent),
            "created_at": sent.get("created_at"), "origin_agent_id": node.agent_id,
            "routed_to": list(sent.get("routed_to", [])), "response_count": len(sent.get("responses", [])),
            "updates": [{k: u.get(k) for k in ("type", "agent_id", "target_agent_id", "timestamp", "sent_at",
                                                  "verified") if k in u or k != "target_agent_id"}
                        for u in sent.get("updates", [])]}


async def webhook_get(node: Node, message_id: str, caller: Caller) -> dict:
    node.rate.check("get_ip", *rate_key(caller, caller.headers.get("x-darkmatter-agent-id")))
    return webhook_status(node, _sent(node, message_id))
