"""Outbound mesh operations (docs/protocol.md §4.2, §4.5, §4.6, §5, §10): what the agent's tools do.

Each operation returns a JSON-shaped dict for the tool result and raises ``ToolError`` with a clear
message for anything the agent should read and fix. Durable steps are persisted before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from darkmatter import PROTOCOL_VERSION
from darkmatter.identity import v2_string, verify
from darkmatter.mesh.connections import (HOPS_CAP, MAX_CONNECTIONS, MAX_PENDING_OUT, accept_body, agent_url_for,
                                         drop_connection, mark_03, new_connection, version_at_least)
from darkmatter.mesh.dispatch import call, check
from darkmatter.mesh.healing import fetch_well_known
from darkmatter.mesh.outbox import append_op
from darkmatter.mesh.transport import SMALL, Caller, Reply
from darkmatter.state import evict_sent
from darkmatter.tools import ToolError
from darkmatter.wire import (MAX_IMPRESSION, MAX_NOTE, ProtocolError, check_content, check_metadata, endpoint,
                             is_fresh, is_self_certifying, new_message_id, normalize, now_iso, origin_key,
                             webhook_problem)

if TYPE_CHECKING:
    from darkmatter.node import Node

log = logging.getLogger(__name__)

SEND_WAIT = 15.0
BROADCAST_GRACE = 0.5  # a broadcast's wait for stragglers after the latest first attempt came back


def _normalize_or_error(url: str) -> str:
    try:
        return normalize(url)
    except ProtocolError as exc:
        raise ToolError(f"Invalid URL {url!r}: {exc.error}") from None


# --- connections ------------------------------------------------------------------------------------


async def request_connection(node: Node, target_url: str) -> dict:
    """§4.2 requester side."""
    target = _normalize_or_error(target_url)
    if node.is_own_url(target):
        raise ToolError("That URL is this node itself.")
    if len(node.connections) >= MAX_CONNECTIONS:
        raise ToolError(f"Connection limit reached ({MAX_CONNECTIONS}); disconnect someone first.")
    doc = await fetch_well_known(node, target, strict=False)
    expected: dict[str, Any] = {}
    if doc is not None and isinstance(doc.get("agent_id"), str):
        if doc["agent_id"] == node.agent_id:
            raise ToolError("That URL serves this node's own identity.")
        expected = {"expected_agent_id": doc["agent_id"],
                    "expected_public_key_hex": (doc.get("public_key_hex") or None) and str(doc["public_key_hex"]).lower(),
                    "expected_protocol_version": doc.get("protocol_version")}
    outbound = node.state["pending_outbound"]
    outbound[:] = [p for p in outbound if origin_key(p["target_base"]) != origin_key(target)]
    if len(outbound) >= MAX_PENDING_OUT:
        raise ToolError("Too many pending outbound requests (50); wait for answers or retry later.")
    entry = {"target_base": target, "expected_agent_id": None, "expected_public_key_hex": None,
             "expected_protocol_version": None, "created_at": now_iso(), **expected}
    outbound.append(entry)
    await node.save()

    ts = now_iso()
    own_url = node.base_url
    body = {"from_agent_id": node.agent_id, "from_agent_url": own_url,
            "from_agent_bio": node.state.get("bio"), "from_agent_display_name": node.state.get("display_name"),
            "from_agent_public_key_hex": node.public_key_hex, "protocol_version": PROTOCOL_VERSION,
            "timestamp": ts}
    body["signature_v2_hex"] = node.sign_v2("connection_request", node.agent_id, own_url, node.public_key_hex, ts)
    reply = await call(node, "POST", endpoint(target, "connection_request"), body=body, timeout=15.0)

    def drop() -> None:
        if entry in outbound:
            outbound.remove(entry)

    if not reply.ok:
        drop()
        await node.save()
        return {"success": False, "status": "failed", "target": target, "http_status": reply.status,
                "error": reply.describe()}
    answer = reply.body
    if answer.get("auto_accepted") is False:
        return {"success": True, "status": "pending", "request_id": answer.get("request_id"), "target": target,
                "message": "Request queued; the other agent will decide."}
    agent_id = answer.get("agent_id")
    key = str(answer.get("agent_public_key_hex") or "").lower() or None
    problem = None
    if not isinstance(agent_id, str) or not agent_id:
        problem = "the reply names no agent_id"
    elif expected.get("expected_agent_id") and (agent_id != expected["expected_agent_id"] or (
            expected.get("expected_public_key_hex") and key != expected["expected_public_key_hex"])):
        problem = "the reply's identity differs from the target's well-known document"
    elif is_self_certifying(agent_id) and key != agent_id:
        problem = "the reply's self-certifying id does not match its key"
    else:
        signature = answer.get("signature_v2_hex")
        must_sign = is_self_certifying(agent_id) or version_at_least(expected.get("expected_protocol_version"))
        if signature or must_sign:
            text = v2_string("connection_accepted", agent_id, answer.get("agent_url"),
                             answer.get("agent_public_key_hex") or "", node.agent_id, answer.get("timestamp"))
            if not signature or not is_fresh(answer.get("timestamp")) or not verify(key, text, signature):
                problem = "the acceptance is not validly signed"
    if problem is None and agent_id in node.connections:
        stored = node.connections[agent_id].get("agent_public_key_hex")
        if stored and stored != key:
            problem = "the reply's key differs from the key stored for that connection"
    drop()
    if problem is not None:
        await node.save()
        return {"success": False, "status": "failed", "target": target, "error": f"Refused: {problem}."}
    if agent_id not in node.connections:
        conn = new_connection(agent_id, target, key, "outbound", bio=answer.get("agent_bio"),
                              display_name=answer.get("agent_display_name"), self_url=own_url,
                              version=answer.get("protocol_version"))
        if answer.get("signature_v2_hex"):
            mark_03(conn)
        node.connections[agent_id] = conn
        await node.save()
        await node.emit("dm_on_connection_changed", agent_id=agent_id, event="connected")
    else:
        await node.save()
    return {"success": True, "status": "connected", "agent_id": agent_id, "agent_url": target,
            "display_name": answer.get("agent_display_name"), "message": answer.get("message") or "Connected."}


async def respond_connection(node: Node, request_id: str, accept: bool) -> dict:
    pending = node.state["pending_requests"]
    request = pending.get(request_id)
    if request is None:
        raise ToolError(f"No pending connection request with id {request_id!r}. "
                        "See darkmatter_list_pending_requests.")
    from_id = request["from_agent_id"]
    if not accept:
        del pending[request_id]
        await node.save()
        ts = now_iso()
        body = {"agent_id": node.agent_id, "requester_agent_id": from_id, "agent_url": node.base_url,
                "agent_public_key_hex": node.public_key_hex, "timestamp": ts,
                "signature_v2_hex": node.sign_v2("connection_rejected", node.agent_id, from_id, ts)}
        reply = await call(node, "POST", endpoint(request["from_agent_url"], "connection_rejected"), body=body,
                           timeout=10.0, max_bytes=SMALL)
        await node.emit("dm_on_connection_changed", agent_id=from_id, event="rejected")
        return {"success": True, "status": "rejected", "agent_id": from_id,
                "notified": reply.ok, "note": None if reply.ok else f"requester not notified: {reply.describe()}"}
    if from_id in node.connections:
        del pending[request_id]
        await node.save()
        return {"success": True, "status": "connected", "agent_id": from_id, "message": "Already connected."}
    if len(node.connections) >= MAX_CONNECTIONS:
        raise ToolError(f"Connection limit reached ({MAX_CONNECTIONS}); disconnect someone first.")
    agent_url = agent_url_for(node, Caller(host=request.get("request_host") or "",
                                           scheme=request.get("request_scheme") or "http"))
    conn = new_connection(from_id, request["from_agent_url"], request.get("from_agent_public_key_hex"), "inbound",
                          bio=request.get("from_agent_bio"), display_name=request.get("from_agent_display_name"),
                          self_url=agent_url, version=request.get("protocol_version"))
    if request.get("signed"):
        mark_03(conn)
    node.connections[from_id] = conn
    del pending[request_id]
    payload = {k: v for k, v in accept_body(node, from_id, agent_url).items()
               if k not in ("timestamp", "signature_v2_hex", "auto_accepted")}
    entry = node.outbox.add("connection_accepted", payload, target_agent_id=from_id,
                            url=request["from_agent_url"])
    await node.save()
    await node.emit("dm_on_connection_changed", agent_id=from_id, event="connected")
    state = await node.outbox.wait_first_attempt(entry, SEND_WAIT)
    return {"success": True, "status": "connected", "agent_id": from_id,
            "acceptance_delivery": state, "last_error": entry.get("last_error")}


async def disconnect(node: Node, agent_id: str) -> dict:
    conn = node.connections.get(agent_id)
    if conn is None:
        raise ToolError(f"Not connected to {agent_id!r}. See darkmatter_list_connections.")
    drop_connection(node, agent_id)
    await node.save()
    await node.emit("dm_on_connection_changed", agent_id=agent_id, event="disconnected")
    ts = now_iso()
    body = {"agent_id": node.agent_id, "peer_agent_id": agent_id, "timestamp": ts,
            "signature_v2_hex": node.sign_v2("disconnect", node.agent_id, agent_id, ts)}
    reply = await call(node, "POST", endpoint(conn["agent_url"], "disconnect"), body=body, timeout=10.0,
                       max_bytes=SMALL)
    return {"success": True, "agent_id": agent_id, "peer_notified": reply.ok}


# --- messages ---------------------------------------------------------------------------------------


def _delivery_record(entry: dict, state: str) -> dict:
    record = {"state": state, "attempts": entry.get("attempts", 0), "last_status": entry.get("last_status"),
              "last_error": entry.get("last_error"), "transport": entry.get("transport", "http"),
              "updated_at": now_iso()}
    if "acknowledged" in entry:
        record["acknowledged"] = entry["acknowledged"]
    return record


async def send_message(node: Node, content: str, target_agent_id: str | None = None,
                       metadata: dict | None = None, hops_remaining: int = 10) -> dict:
    """§5.1."""
    try:
        check_content(content)
        metadata = check_metadata(metadata)
    except ProtocolError as exc:
        raise ToolError(exc.error) from None
    if not isinstance(hops_remaining, int) or isinstance(hops_remaining, bool) or not 1 <= hops_remaining <= HOPS_CAP:
        raise ToolError(f"hops_remaining must be an integer from 1 to {HOPS_CAP}.")
    if target_agent_id:
        if target_agent_id not in node.connections:
            raise ToolError(f"Not connected to {target_agent_id!r}. See darkmatter_list_connections.")
        targets = [target_agent_id]
    else:
        targets = list(node.connections)
    if not targets:
        raise ToolError("No connections to send to. Connect first with darkmatter_request_connection.")
    message_id = new_message_id()
    webhook = endpoint(node.base_url, "webhook", message_id)
    sent = {"message_id": message_id, "content": content, "status": "active", "initial_hops": hops_remaining,
            "routed_to": [], "created_at": now_iso(), "updates": [], "response": None, "webhook": webhook,
            "metadata": metadata, "responses": [], "deliveries": {}}
    node.state["sent_messages"][message_id] = sent
    payload = {"message_id": message_id, "content": content, "webhook": None, "hops_remaining": hops_remaining,
               "metadata": metadata}
    entries = []
    for target in targets:
        entry = node.outbox.add("message", dict(payload), target_agent_id=target, message_id=message_id)
        sent["deliveries"][target] = _delivery_record(entry, "queued")
        entries.append(entry)
    # NOTE: the first attempts started in outbox.add and run while this record is fsynced; the call returns
    # only once both are done. Everything is marked here, before the first await (darkmatter/storage.py).
    ops = [("set", ["sent_messages", message_id], sent), *(append_op(e) for e in entries),
           *(("del", ["sent_messages", old]) for old in evict_sent(node.state))]
    await node.save(ops)
    await _first_attempts(node, entries, broadcast=target_agent_id is None)
    deliveries = sent["deliveries"]
    ok = any(d["state"] in ("delivered", "queued") for d in deliveries.values())
    return {"success": ok, "message_id": message_id, "webhook": webhook, "broadcast": target_agent_id is None,
            "deliveries": deliveries, "routed_to": list(sent["routed_to"])}


async def _first_attempts(node: Node, entries: list[dict], *, broadcast: bool) -> None:
    """Wait for the entries' first delivery attempts (each at most SEND_WAIT).

    A broadcast stops waiting BROADCAST_GRACE after the latest attempt came back: one hung peer (its attempt
    ends only at the 15 s request timeout) must not hold the call, while the peers that answer are still
    reported as delivered. Stragglers show as queued; their delivery goes on in the outbox."""
    waits = [asyncio.ensure_future(node.outbox.wait_first_attempt(e, SEND_WAIT)) for e in entries]
    pending = set(waits)
    timeout = None  # until the first attempt comes back (each wait ends by SEND_WAIT anyway)
    for _ in range(len(waits)):
        done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done or not pending:
            break
        if broadcast:
            timeout = BROADCAST_GRACE
    for wait in pending:
        wait.cancel()


def _inbox_entry(node: Node, message_id: str) -> dict:
    for entry in node.state["inbox"]:
        if entry["message_id"] == message_id:
            return entry
    raise ToolError(f"No message {message_id!r} in the inbox. See darkmatter_list_inbox.")


async def check_webhook(node: Node, entry: dict) -> str | None:
    """§7: the reason the entry's webhook is blocked, or None."""
    problem = webhook_problem(entry.get("webhook"), entry["message_id"])
    if problem:
        return problem
    return await check(node, entry["webhook"], strict=True)


def _claim(node: Node, entry: dict):
    """The plugin claim on an inbox entry answered outside the mesh (``dm_claim_message``), or None."""
    return node.pm.hook.dm_claim_message(node=node, message=dict(entry))


async def forward_message(node: Node, message_id: str, target_agent_id: str, note: str | None = None,
                          force: bool = False) -> dict:
    """§5.3."""
    entry = _inbox_entry(node, message_id)
    if _claim(node, entry) is not None:
        raise ToolError(f"Message {message_id!r} came from outside the mesh ({entry['from_agent_id'][:64]}) and "
                        "cannot be forwarded; answer it with darkmatter_respond_message.")
    if note is not None and len(note) > MAX_NOTE:
        raise ToolError(f"note is longer than {MAX_NOTE} characters.")
    if target_agent_id == node.agent_id or target_agent_id not in node.connections:
        raise ToolError(f"Cannot forward to {target_agent_id!r}: not one of your connections.")
    if entry["hops_remaining"] <= 0:
        if not entry.get("expired_reported"):
            entry["expired_reported"] = True  # before the await: a concurrent forward must not report it again
            blocked = await check_webhook(node, entry)
            ops: list = [("set", [*inbox_path(message_id), "expired_reported"], True)]  # a set: safe to mark late
            if not blocked:
                ops.append(append_op(node.outbox.add(
                    "webhook_update", {"type": "expired", "agent_id": node.agent_id,
                                       "note": "Message expired — no hops remaining."},
                    url=entry["webhook"], message_id=message_id)))
            await node.save(ops)
            await node.emit("dm_on_message_expired", message_id=message_id, reason="no hops remaining")
        raise ToolError("Message expired — hops_remaining is 0.")
    problem = await check_webhook(node, entry)
    if problem:
        raise ToolError(f"Webhook blocked: {problem}")
    reply = await call(node, "GET", entry["webhook"], timeout=10.0, max_bytes=SMALL, strict=True)
    warning = None
    remote: dict = {}
    if reply.status == 200 and isinstance(reply.body, dict):
        remote = reply.body
        if remote.get("status") in ("expired", "responded"):
            node.state["inbox"].remove(entry)
            await node.save([("del", inbox_path(message_id))])
            raise ToolError(f"Message is already {remote['status']} (checked via webhook). Removed from queue.")
    elif reply.status == 404 and not force:
        raise ToolError("Webhook does not know this message (404). Retry with force=true to forward anyway.")
    else:
        warning = f"Could not check the webhook ({reply.describe()}); loop detection used local knowledge only."
    loop_set = {node.agent_id, entry["from_agent_id"], *entry.get("forwarded_to", [])}
    if isinstance(remote.get("origin_agent_id"), str):
        loop_set.add(remote["origin_agent_id"])
    loop_set.update(x for x in remote.get("routed_to") or [] if isinstance(x, str))
    for update in remote.get("updates") or []:
        if isinstance(update, dict) and update.get("type") == "forwarded":
            loop_set.update(x for x in (update.get("agent_id"), update.get("target_agent_id")) if isinstance(x, str))
    if target_agent_id in loop_set and not force:
        raise ToolError(f"Agent '{target_agent_id}' has already received this message. "
                        "To forward anyway, retry with force=true.")
    payload = {"message_id": message_id, "content": entry["content"], "webhook": entry["webhook"],
               "hops_remaining": entry["hops_remaining"] - 1, "metadata": entry.get("metadata") or {},
               "note": note}
    out = node.outbox.add("forward", payload, target_agent_id=target_agent_id, message_id=message_id)
    await node.save([append_op(out)])  # the first attempt runs meanwhile
    # NOTE: the call returns once the target has the message (§5.3: it reports `delivery`). The `forwarded`
    # update is queued on delivery and its first attempt starts at once, but the call does not wait for it:
    # that was one more round trip (and the owner's fsync) on every forward. An answer from the target that
    # reaches the owner first is refused `not_on_route` and retried shortly (outbox.ROUTE_RACE_FIRST_RETRY).
    state = await node.outbox.wait_first_attempt(out, SEND_WAIT)
    result = {"success": state in ("delivered", "queued"), "message_id": message_id, "target_agent_id": target_agent_id,
              "delivery": state, "hops_remaining": payload["hops_remaining"], "message_still_in_queue": True,
              "last_error": out.get("last_error")}
    if warning:
        result["warning"] = warning
    return result


async def respond_message(node: Node, message_id: str, response: str, metadata: dict | None = None) -> dict:
    """§5.4."""
    entry = _inbox_entry(node, message_id)
    try:
        check_content(response, "response")
        metadata = check_metadata(metadata) if metadata is not None else (entry.get("metadata") or {})
    except ProtocolError as exc:
        raise ToolError(exc.error) from None
    claim = _claim(node, entry)
    if claim is not None:
        outcome = await claim.respond(entry, response, metadata)
        if entry in node.state["inbox"]:
            node.state["inbox"].remove(entry)
        await node.save()
        state = outcome.get("delivery", "delivered")
        await node.emit("dm_on_message_responded", message_id=message_id, response=response, delivery=state)
        return {"success": state != "failed", "message_id": message_id, "delivery": state,
                "last_error": outcome.get("last_error")}
    problem = await check_webhook(node, entry)
    if problem:
        raise ToolError(f"Webhook blocked: {problem}")
    payload = {"type": "response", "agent_id": node.agent_id, "response": response, "metadata": metadata}
    out = node.outbox.add("response", payload, url=entry["webhook"], message_id=message_id)
    out["from_agent_id"] = entry["from_agent_id"]
    node.state["inbox"].remove(entry)
    await node.save([append_op(out), ("del", inbox_path(message_id))])  # the delivery runs meanwhile
    state = await node.outbox.wait(out, SEND_WAIT)
    await node.emit("dm_on_message_responded", message_id=message_id, response=response, delivery=state)
    return {"success": state != "failed", "message_id": message_id, "delivery": state,
            "last_error": out.get("last_error")}


async def expire_message(node: Node, message_id: str) -> dict:
    sent = node.state["sent_messages"].get(message_id)
    if sent is None:
        entry = next((m for m in node.state["inbox"] if m["message_id"] == message_id), None)
        claim = _claim(node, entry) if entry is not None else None
        if claim is None:
            raise ToolError(f"No sent message {message_id!r}. See darkmatter_list_messages.")
        await claim.expire(entry)
        if entry in node.state["inbox"]:
            node.state["inbox"].remove(entry)
        await node.save()
        await node.emit("dm_on_message_expired", message_id=message_id, reason="expired by the agent")
        return {"success": True, "message_id": message_id, "status": "expired"}
    sent["status"] = "expired"
    await node.save([("set", ["sent_messages", message_id, "status"], "expired")])
    await node.emit("dm_on_message_expired", message_id=message_id, reason="expired by owner")
    return {"success": True, "message_id": message_id, "status": "expired"}


# --- impressions ------------------------------------------------------------------------------------


async def ask_impression(node: Node, agent_id: str, about_agent_id: str) -> dict:
    conn = node.connections.get(agent_id)
    if conn is None:
        raise ToolError(f"Not connected to {agent_id!r}: impressions are asked of connections only.")
    path = "/__darkmatter__/impression/" + about_agent_id
    reply = await call(node, "GET", endpoint(conn["agent_url"], "impression", about_agent_id), timeout=10.0,
                       max_bytes=SMALL, headers=node.signed_get_headers(path, agent_id))
    if not reply.ok:
        raise ToolError(f"{agent_id[:16]} did not share an impression: {reply.describe()}")
    text = reply.body.get("impression")
    return {"agent_id": agent_id, "about": about_agent_id, "has_impression": bool(reply.body.get("has_impression")),
            "impression": text[:MAX_IMPRESSION] if isinstance(text, str) else None}


# --- outbox callbacks -------------------------------------------------------------------------------


def on_outbox_progress(node: Node, entry: dict, reply: Reply) -> list:
    if entry["kind"] == "message":
        sent = node.state["sent_messages"].get(entry["message_id"])
        if sent is not None:
            record = sent["deliveries"][entry["target_agent_id"]] = _delivery_record(entry, "queued")
            return [("set", ["sent_messages", entry["message_id"], "deliveries", entry["target_agent_id"]], record)]
    return []


def on_outbox_finished(node: Node, entry: dict, reply: Reply) -> list:
    """Record an entry's outcome; return the journal ops of what changed."""
    kind = entry["kind"]
    state = entry["state"]
    target = entry.get("target_agent_id")
    conn = node.connections.get(target) if target else None
    ops: list = []
    if kind in ("message", "forward") and conn is not None and state == "delivered":
        conn["messages_sent"] = conn.get("messages_sent", 0) + 1
        conn["last_activity"] = now_iso()
        conn["health_failures"] = 0
        path = ["connections", target]
        ops += [("set", [*path, "messages_sent"], conn["messages_sent"]),
                ("set", [*path, "last_activity"], conn["last_activity"]), ("set", [*path, "health_failures"], 0)]
    if kind == "message":
        sent = node.state["sent_messages"].get(entry["message_id"])
        if sent is not None:
            path = ["sent_messages", entry["message_id"]]
            record = sent["deliveries"][target] = _delivery_record(entry, state)
            ops.append(("set", [*path, "deliveries", target], record))
            if state == "delivered" and target not in sent["routed_to"]:
                sent["routed_to"].append(target)
                ops.append(("append", [*path, "routed_to"], target))
        node.changed()
    elif kind == "forward" and state == "delivered":
        message_id = entry["message_id"]
        for item in node.state["inbox"]:
            if item["message_id"] == message_id:
                if target not in item["forwarded_to"]:
                    item["forwarded_to"].append(target)
                    ops.append(("append", [*inbox_path(message_id), "forwarded_to"], target))
                if webhook_problem(item["webhook"], message_id) is None:
                    ops.append(append_op(node.outbox.add(
                        "webhook_update", {"type": "forwarded", "agent_id": node.agent_id, "target_agent_id": target,
                                           "note": entry["payload"].get("note")},
                        url=item["webhook"], message_id=message_id)))
                node.spawn(node.emit("dm_on_message_forwarded", message=item, target_agent_id=target))
                break
    elif kind == "response" and state == "delivered":
        sender_id = entry.get("from_agent_id") or ""
        sender = node.connections.get(sender_id)
        if sender is not None:
            sender["total_response_time_ms"] = sender.get("total_response_time_ms", 0) + int(reply.elapsed_ms)
            ops.append(("set", ["connections", sender_id, "total_response_time_ms"], sender["total_response_time_ms"]))
    elif state == "failed":
        node.changed()
    return ops


def inbox_path(message_id: str) -> list:
    """The journal path of an inbox entry (darkmatter/storage.py)."""
    return ["inbox", {"message_id": message_id}]


def response_time_ms(conn: dict) -> float | None:
    sent = conn.get("messages_received") or 0
    total = conn.get("total_response_time_ms") or 0
    return round(total / sent, 1) if sent and total else None


def now() -> float:
    return time.time()
