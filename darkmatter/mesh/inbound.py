"""Inbound mesh protocol: what a node does with each operation of docs/protocol.md §4–§6 and §10.

Transport-neutral: :func:`handle` is the one entry every transport calls, with the operation's name, the
parsed JSON body (or path parameter) and a :class:`Caller` describing where the request came from; it
returns the 200 body or raises ``ProtocolError``. ``ROUTES`` maps the HTTP shape of every operation
(method and path) to its name, for transports that speak in paths. Refusals never change state.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from darkmatter import PROTOCOL_VERSION
from darkmatter.identity import peer_update_string, v1_string, v2_message, v2_string, verify
from darkmatter.mesh import admission, healing
from darkmatter.mesh.checks import (check_peer_url, check_signed, optional_key, optional_sig, rate_key,
                                    self_certifying_rules)
from darkmatter.mesh.connections import (HOPS_CAP, MAX_CONNECTIONS, MAX_PENDING_IN, PENDING_TTL, accept_body,
                                         add_notice, drop_connection, inactive_check, known_03, mark_03,
                                         new_connection, persist, save_failed, version_at_least, agent_url_for)
from darkmatter.mesh.transport import Caller
from darkmatter.mesh.webhooks import webhook_get, webhook_post
from darkmatter.wire import (MAX_BIO, MAX_NAME, MAX_NOTE, ProtocolError, age_seconds, bad, check_content, check_hex,
                             check_id, check_message_id, check_metadata, forbidden, get_int, get_str, is_fresh,
                             is_self_certifying, new_message_id, new_request_id, now_iso, origin_key, parse_ts,
                             require, truncate, webhook_problem)

if TYPE_CHECKING:
    from darkmatter.node import Node

SEEN_MIN_AGE = 600
SEEN_MAX_AGE = 24 * 3600
SEEN_MAX = 10000


# --- handshake (§4.3–§4.6) -------------------------------------------------------------------------


async def connection_request(node: Node, body: dict, caller: Caller) -> dict:
    inactive_check(node)
    key, scale = rate_key(caller, body.get("from_agent_id"))
    node.rate.check("connection_request_ip", key, scale)
    node.rate.check("connection_request_node")
    require(body, "from_agent_id", "from_agent_url")
    from_id = check_id(body["from_agent_id"], "from_agent_id")
    from_url = check_peer_url(node, body["from_agent_url"], "from_agent_url")
    presented = optional_key(body, "from_agent_public_key_hex")
    bio = get_str(body, "from_agent_bio")
    name = get_str(body, "from_agent_display_name")
    version = get_str(body, "protocol_version", max_len=32)
    signature = optional_sig(body)
    timestamp = get_str(body, "timestamp", max_len=64)
    self_certifying_rules(from_id, presented, signature)
    if from_id == node.agent_id:
        raise forbidden("Refusing a connection request from this node's own id")
    existing = node.connections.get(from_id)
    stored = existing.get("agent_public_key_hex") if existing else None
    signed = False
    if signature is not None:
        verify_key = stored or presented
        check_signed(verify_key, v2_string("connection_request", from_id, body["from_agent_url"],
                                           body.get("from_agent_public_key_hex") or "", timestamp),
                     signature, timestamp)
        signed = True

    agent_url = agent_url_for(node, caller)
    if existing is not None:
        if stored and presented != stored:
            raise forbidden("Public key mismatch", "key_mismatch")
        before = {k: existing.get(k) for k in ("agent_url", "self_url", "known_03", "protocol_version",
                                               "health_failures")}
        if signed and stored and not node.is_own_url(from_url) and origin_key(from_url) != origin_key(existing["agent_url"]):
            if await healing.verify_url(node, from_id, from_url):
                existing["agent_url"] = from_url
                node.outbox.kick()
        if node.is_own_url(agent_url):
            existing["self_url"] = agent_url
        # NOTE: only the stored key's own signature says this peer speaks 0.3 (§3.3). An unsigned request,
        # or one signed with a key presented to a keyless connection, could otherwise switch on downgrade
        # protection and get a real 0.2 peer's messages and webhook updates refused.
        if signed and stored:
            mark_03(existing)
            if version:
                existing["protocol_version"] = version
        existing["health_failures"] = 0

        await persist(node, lambda: existing.update(before))
        return {**accept_body(node, from_id, agent_url), "message": "Already connected."}

    request = {"from_agent_id": from_id, "from_agent_url": from_url, "from_agent_bio": truncate(bio, MAX_BIO),
               "from_agent_display_name": truncate(name, MAX_NAME) or None,
               "from_agent_public_key_hex": presented, "protocol_version": version, "signed": signed}
    decision = node.pm.hook.dm_trust_connection_request(node=node, request=dict(request))
    if decision == "reject":
        raise forbidden("Connection request declined by this agent's policy")
    evicted = None
    if decision == "accept" and len(node.connections) >= MAX_CONNECTIONS:
        evicted = admission.evict_probationary(node, from_id)  # §13.2: no lock-out
    if decision == "accept" and len(node.connections) < MAX_CONNECTIONS:
        conn = new_connection(from_id, from_url, presented, "inbound", bio=bio, display_name=name,
                              self_url=agent_url, version=version)
        conn["auto_accepted"] = True
        if signed:
            mark_03(conn)
        node.connections[from_id] = conn
        old_pending = node.state["pending_requests"]
        node.state["pending_requests"] = {k: v for k, v in old_pending.items()
                                          if v.get("from_agent_id") != from_id}

        def undo_accept() -> None:
            node.connections.pop(from_id, None)
            node.state["pending_requests"] = old_pending
            if evicted is not None:
                node.connections[evicted["agent_id"]] = evicted
        await persist(node, undo_accept)
        if evicted is not None:
            node.spawn(admission.say_goodbye(node, evicted), name="evicted-disconnect")
            await node.emit("dm_on_connection_changed", agent_id=evicted["agent_id"], event="disconnected")
        await node.emit("dm_on_connection_changed", agent_id=from_id, event="connected")
        return accept_body(node, from_id, agent_url)

    pending = node.state["pending_requests"]
    prune_pending(node)
    for request_id, entry in pending.items():
        if entry.get("from_agent_id") == from_id:
            if signed and presented and presented == entry.get("from_agent_public_key_hex"):
                old_entry = dict(entry)
                entry.update(from_agent_url=from_url, from_agent_bio=request["from_agent_bio"],
                             from_agent_display_name=request["from_agent_display_name"])
                await persist(node, lambda: entry.update(old_entry))
            return {"auto_accepted": False, "request_id": request_id,
                    "message": "Connection request queued. Awaiting agent decision."}
    gave_way: dict = {}
    if len(pending) >= MAX_PENDING_IN:
        before = dict(pending)
        dropped = admission.make_room_for_request(node)  # §13.2: the oldest unvouched stranger gives way
        if dropped is None:
            raise ProtocolError(429, "capacity", "Too many pending requests")
        gave_way = {dropped: before[dropped]}
    request_id = new_request_id()
    pending[request_id] = {**request, "request_id": request_id, "request_host": caller.host,
                           "request_scheme": caller.headers.get("x-forwarded-proto") or caller.scheme,
                           "requested_at": now_iso()}

    def undo_request() -> None:
        pending.pop(request_id, None)
        pending.update(gave_way)
    await persist(node, undo_request)
    await node.emit("dm_on_connection_changed", agent_id=from_id, event="requested")
    return {"auto_accepted": False, "request_id": request_id,
            "message": "Connection request queued. Awaiting agent decision."}


def prune_pending(node: Node) -> None:
    pending = node.state["pending_requests"]
    for request_id, entry in list(pending.items()):
        age = age_seconds(entry.get("requested_at"))
        if age is None or age > PENDING_TTL:
            del pending[request_id]
    outbound = node.state["pending_outbound"]
    outbound[:] = [p for p in outbound if (age_seconds(p.get("created_at")) or 0) <= PENDING_TTL]


def find_pending_outbound(node: Node, agent_id: str | None, agent_url: str | None) -> dict | None:
    for entry in node.state["pending_outbound"]:
        if agent_id and entry.get("expected_agent_id") == agent_id:
            return entry
    for entry in node.state["pending_outbound"]:
        try:
            if agent_url and origin_key(entry["target_base"]) == origin_key(agent_url):
                return entry
        except ProtocolError:
            continue
    return None


async def connection_accepted(node: Node, body: dict, caller: Caller) -> dict:
    require(body, "agent_id", "agent_url")
    agent_id = check_id(body["agent_id"], "agent_id")
    agent_url = check_peer_url(node, body["agent_url"], "agent_url")
    presented = optional_key(body, "agent_public_key_hex")
    signature = optional_sig(body)
    timestamp = get_str(body, "timestamp", max_len=64)
    version = get_str(body, "protocol_version", max_len=32)
    bio = get_str(body, "agent_bio")
    name = get_str(body, "agent_display_name")
    self_certifying_rules(agent_id, presented, signature)
    pending = find_pending_outbound(node, agent_id, agent_url)
    existing = node.connections.get(agent_id)
    if pending is None:
        if existing is not None and existing.get("agent_public_key_hex") == presented:
            return {"success": True}
        raise forbidden("No pending outbound connection request for this agent.")
    expected_id = pending.get("expected_agent_id")
    expected_key = pending.get("expected_public_key_hex")
    if expected_id is not None and (agent_id != expected_id or (expected_key and presented != expected_key)):
        raise forbidden("Public key mismatch: not the identity this node asked to connect to", "key_mismatch")
    needs_signature = is_self_certifying(agent_id) or version_at_least(pending.get("expected_protocol_version"))
    if signature is not None or needs_signature:
        if signature is None:
            raise forbidden("Signature required", "signature_required")
        check_signed(expected_key or presented, v2_string(
            "connection_accepted", agent_id, body["agent_url"], body.get("agent_public_key_hex") or "",
            node.agent_id, timestamp), signature, timestamp)
    if existing is not None:
        if existing.get("agent_public_key_hex") and existing["agent_public_key_hex"] != presented:
            raise forbidden("Public key mismatch", "key_mismatch")
        outbound = node.state["pending_outbound"]
        index = outbound.index(pending)
        outbound.remove(pending)
        await persist(node, lambda: outbound.insert(index, pending))
        return {"success": True}
    if len(node.connections) >= MAX_CONNECTIONS:
        raise ProtocolError(429, "capacity", "Connection limit reached")
    conn = new_connection(agent_id, pending["target_base"], presented, "outbound", bio=bio, display_name=name,
                          self_url=node.base_url, version=version)
    if signature is not None:
        mark_03(conn)
    node.connections[agent_id] = conn
    outbound = node.state["pending_outbound"]
    index = outbound.index(pending)
    outbound.remove(pending)

    def undo_accepted() -> None:
        node.connections.pop(agent_id, None)
        outbound.insert(index, pending)
    await persist(node, undo_accepted)
    await node.emit("dm_on_connection_changed", agent_id=agent_id, event="connected")
    return {"success": True}


async def connection_rejected(node: Node, body: dict, caller: Caller) -> dict:
    require(body, "agent_id", "requester_agent_id", "timestamp", "signature_v2_hex")
    agent_id = check_id(body["agent_id"], "agent_id")
    requester = check_id(body["requester_agent_id"], "requester_agent_id")
    signature = optional_sig(body)
    timestamp = get_str(body, "timestamp", max_len=64)
    reason = get_str(body, "reason", max_len=MAX_NOTE)
    agent_url = body.get("agent_url")
    if agent_url is not None:
        agent_url = check_peer_url(node, agent_url, "agent_url")
    if requester != node.agent_id:
        raise forbidden("This rejection is not addressed to this node")
    pending = find_pending_outbound(node, agent_id, agent_url)
    if pending is None:
        raise ProtocolError(404, "not_found", "No pending outbound connection request for this agent")
    key = pending.get("expected_public_key_hex") or (agent_id if is_self_certifying(agent_id) else None)
    if not key:
        raise forbidden("Cannot verify a rejection from a keyless agent", "invalid_signature")
    check_signed(key, v2_string("connection_rejected", agent_id, requester, timestamp), signature, timestamp)
    node.state["pending_outbound"].remove(pending)
    add_notice(node, "rejected", agent_id, reason or "Connection request rejected")
    await node.save()
    await node.emit("dm_on_connection_changed", agent_id=agent_id, event="rejected")
    return {"success": True}


async def disconnect(node: Node, body: dict, caller: Caller) -> dict:
    require(body, "agent_id", "peer_agent_id")
    agent_id = check_id(body["agent_id"], "agent_id")
    peer = check_id(body["peer_agent_id"], "peer_agent_id")
    signature = optional_sig(body)
    timestamp = get_str(body, "timestamp", max_len=64)
    reason = get_str(body, "reason", max_len=MAX_NOTE)
    if agent_id not in node.connections:
        return {"success": True, "disconnected": False}
    if peer != node.agent_id:
        raise forbidden("This disconnect is not addressed to this node")
    key = node.key_of(agent_id)
    if key is None:
        raise forbidden("Cannot verify a disconnect from a keyless connection", "signature_required")
    if signature is None:
        raise forbidden("Signature required", "signature_required")
    check_signed(key, v2_string("disconnect", agent_id, peer, timestamp), signature, timestamp)
    drop_connection(node, agent_id)
    add_notice(node, "disconnected", agent_id, reason or "The peer disconnected")
    await node.save()
    await node.emit("dm_on_connection_changed", agent_id=agent_id, event="disconnected")
    return {"success": True, "disconnected": True}


# --- messages (§4.7, §3.6, §3.7) --------------------------------------------------------------


def verify_message(node: Node, body: dict, conn: dict) -> tuple[bool, int | None]:
    """§3.6 for a sender that is a connection. Returns (verified, signature_version)."""
    sender = body["from_agent_id"]
    key = node.key_of(sender)
    if key is None:
        return False, None
    presented = body.get("from_public_key_hex")
    if presented in (None, ""):
        raise forbidden("Signature required: this connection has a key", "signature_required")
    if check_hex(presented, "from_public_key_hex", 64) != key:
        raise forbidden("Public key mismatch", "key_mismatch")
    timestamp = body.get("timestamp")
    if not isinstance(timestamp, str) or not is_fresh(timestamp):
        raise forbidden("Stale or missing timestamp", "stale_timestamp")
    sig2 = optional_sig(body)
    if sig2 is not None:
        text = v2_message(sender, node.agent_id, body["message_id"], timestamp, body["hops_remaining"],
                          body["webhook"], body["content"], body.get("metadata") or {})
        if not verify(key, text, sig2):
            raise forbidden("Invalid signature", "invalid_signature")
        mark_03(conn)
        return True, 2
    if known_03(conn):
        raise forbidden("Signature required: a 0.3 peer must send signature_v2_hex", "signature_required")
    sig1 = optional_sig(body, "signature_hex")
    if sig1 is None or not verify(key, v1_string(sender, body["message_id"], timestamp, body["content"]), sig1):
        raise forbidden("Invalid signature", "invalid_signature")
    return True, 1


class InboxIndex:
    """The inbox's message ids and per-sender counts, so that accepting a message costs O(1) however full
    the inbox is (a linear scan per message made throughput fall with the inbox's size).

    Only :func:`message` appends to the inbox, and it keeps the index current; anything else (respond,
    forward, a plugin) may only remove entries, which changes the list's length. So the index is valid
    while the inbox is the same list object with the length, first and last entry it had when the index
    was last brought up to date; otherwise it is rebuilt (one scan, after an agent removed something)."""

    __slots__ = ("key", "ids", "senders")

    def __init__(self, inbox: list):
        self.ids: set = set()
        self.senders: dict = {}
        for m in inbox:
            self.add(m)
        self.key = self.fingerprint(inbox)

    @staticmethod
    def fingerprint(inbox: list) -> tuple:
        return (id(inbox), len(inbox), id(inbox[0]) if inbox else 0, id(inbox[-1]) if inbox else 0)

    def add(self, entry: dict) -> None:
        self.ids.add(entry.get("message_id"))
        sender = entry.get("from_agent_id")
        self.senders[sender] = self.senders.get(sender, 0) + 1


def inbox_index(node: Node) -> InboxIndex:
    inbox = node.state["inbox"]
    index = node.inbox_index
    if index is None or index.key != InboxIndex.fingerprint(inbox):
        index = node.inbox_index = InboxIndex(inbox)
    return index


def seen(node: Node, message_id: str) -> bool:
    if message_id in node.state["seen_message_ids"]:
        return True
    return message_id in inbox_index(node).ids


def remember(node: Node, message_id: str) -> None:
    ids = node.state["seen_message_ids"]
    now = time.time()
    ids[message_id] = int(now)
    # Prune every 500 new ids, also above SEEN_MAX: pruning on every message once over the cap scanned all
    # 10 000 ids per message whenever none was old enough to go (a sustained burst).
    if len(ids) % 500 == 0 or (len(ids) > SEEN_MAX and len(ids) >= node.seen_prune_at):
        for mid, stamp in list(ids.items()):
            age = now - stamp
            if age > SEEN_MAX_AGE or (len(ids) > SEEN_MAX and age > SEEN_MIN_AGE):
                del ids[mid]
        node.seen_prune_at = len(ids) + 500


def admit(node: Node, sender: str) -> tuple[list, InboxIndex]:
    """§13.1 and §13.2 for one more inbox message from ``sender``: its rate limit and the node's, the inbox
    cap and one sender's half of it. Returns the inbox and its index."""
    node.rate.check("message_peer", sender)
    node.rate.check("message_node")
    inbox = node.state["inbox"]
    if len(inbox) >= node.config.inbox_max:
        raise ProtocolError(429, "capacity", "Message queue full")
    index = inbox_index(node)
    if index.senders.get(sender, 0) >= max(1, node.config.inbox_max // 2):
        raise ProtocolError(429, "capacity", "Message queue full for this sender")
    return inbox, index


def enqueue(node: Node, inbox: list, index: InboxIndex, entry: dict) -> None:
    """Append an admitted entry to the inbox, keep the index current and remember its id (not yet durable)."""
    inbox.append(entry)
    index.add(entry)
    index.key = InboxIndex.fingerprint(inbox)
    remember(node, entry["message_id"])


async def message(node: Node, body: dict, caller: Caller) -> dict:
    inactive_check(node)
    require(body, "message_id", "webhook", "from_agent_id")
    if "content" not in body or body["content"] is None:
        raise ProtocolError(400, "missing_fields", "Missing required fields: content")
    message_id = check_message_id(body["message_id"])
    sender = check_id(body["from_agent_id"], "from_agent_id")
    get_str(body, "webhook")
    hops = get_int(body, "hops_remaining", 10)
    if hops < 0:
        raise bad("Field 'hops_remaining' must not be negative")
    body["hops_remaining"] = hops
    for name in ("timestamp", "from_public_key_hex", "signature_hex", "signature_v2_hex"):
        get_str(body, name)
    check_content(body["content"])
    metadata = check_metadata(body.get("metadata"))
    problem = webhook_problem(body["webhook"], message_id)
    if problem:
        raise bad(f"Invalid webhook: {problem}")
    conn = node.connections.get(sender)
    if conn is None:
        raise forbidden("Not connected — only connected agents can send messages.", "not_connected")
    verified, sig_version = verify_message(node, body, conn)
    if seen(node, message_id):
        return {"success": True, "duplicate": True}
    inbox, index = admit(node, sender)
    now = now_iso()
    entry = {"message_id": message_id, "content": body["content"], "webhook": body["webhook"],
             "hops_remaining": min(hops, HOPS_CAP), "from_agent_id": sender, "metadata": metadata,
             "received_at": now, "verified": verified, "signature_version": sig_version,
             "forwarded_to": [], "transport": caller.transport}
    counters = (node.state.get("messages_handled", 0), {k: conn.get(k) for k in (
        "messages_received", "last_activity", "health_failures")})
    enqueue(node, inbox, index, entry)
    node.state["messages_handled"] = node.state.get("messages_handled", 0) + 1
    conn["messages_received"] = conn.get("messages_received", 0) + 1
    conn["last_activity"] = now
    if verified:
        conn["health_failures"] = 0

    def undo() -> None:  # the inbox index notices the removal and rebuilds itself
        if entry in inbox:
            inbox.remove(entry)
        node.state["seen_message_ids"].pop(message_id, None)
        node.state["messages_handled"] = counters[0]
        conn.update(counters[1])
    path = ["connections", sender]
    await persist(node, undo, [("append", ["inbox"], entry),
                              ("set", ["seen_message_ids", message_id], node.state["seen_message_ids"][message_id]),
                              ("set", ["messages_handled"], node.state["messages_handled"]),
                              ("set", [*path, "messages_received"], conn["messages_received"]),
                              ("set", [*path, "last_activity"], conn["last_activity"]),
                              ("set", [*path, "health_failures"], conn.get("health_failures", 0))])
    await node.emit("dm_on_message_received", message=entry)
    return {"success": True, "queued": True, "queue_position": len(inbox)}


async def external_message(node: Node, sender: str, content: Any, metadata: Any = None, *,
                           transport: str) -> dict:
    """Accept a message from outside the mesh into the inbox, for a bridge plugin (e.g. A2A).

    ``sender`` is a pseudo-peer id ``<transport>:<id>``, which is never a mesh agent_id. The message is
    unverified and marked ``outside_mesh``; it has no webhook (its answer goes back through the plugin that
    claims it, see ``dm_claim_message``) and no hops. Otherwise the rules of §4.7 apply: inactive → 503,
    content and metadata limits, the sender's and the node's message rate limits (§13.1), the inbox cap and
    one sender's half of it (§13.2). Durable on return; returns the inbox entry (treat it as read-only)."""
    inactive_check(node)
    sender = check_id(sender, "from_agent_id")
    if not transport or not sender.startswith(transport + ":"):
        raise bad(f"An outside sender's id must start with '{transport}:'")
    check_content(content)
    metadata = check_metadata(metadata)
    inbox, index = admit(node, sender)
    message_id = new_message_id()
    entry = {"message_id": message_id, "content": content, "webhook": None, "hops_remaining": 0,
             "from_agent_id": sender, "metadata": metadata, "received_at": now_iso(), "verified": False,
             "signature_version": None, "forwarded_to": [], "transport": transport, "outside_mesh": True}
    handled = node.state.get("messages_handled", 0)
    enqueue(node, inbox, index, entry)
    node.state["messages_handled"] = handled + 1

    def undo() -> None:
        if entry in inbox:
            inbox.remove(entry)
        node.state["seen_message_ids"].pop(message_id, None)
        node.state["messages_handled"] = handled
    await persist(node, undo, [("append", ["inbox"], entry),
                              ("set", ["seen_message_ids", message_id], node.state["seen_message_ids"][message_id]),
                              ("set", ["messages_handled"], node.state["messages_handled"])])
    await node.emit("dm_on_message_received", message=entry)
    return entry


# --- status, network info, lookups (§4.8–§4.10, §8.3) ---------------------------------------------


def authenticated_as(node: Node, caller: Caller, path: str) -> str | None:
    """§3.8: the connection a signed GET authenticates as, or None."""
    agent_id = caller.headers.get("x-darkmatter-agent-id")
    timestamp = caller.headers.get("x-darkmatter-timestamp")
    signature = caller.headers.get("x-darkmatter-signature")
    if not agent_id or agent_id not in node.connections:
        return None
    key = node.key_of(agent_id)
    if not key or not is_fresh(timestamp):
        return None
    if not verify(key, v2_string("request", "GET", path, agent_id, node.agent_id, timestamp), signature):
        return None
    return agent_id


async def status(node: Node, caller: Caller) -> dict:
    node.rate.check("get_ip", *rate_key(caller, caller.headers.get("x-darkmatter-agent-id")))
    return node.public_status()


async def network_info(node: Node, caller: Caller) -> dict:
    node.rate.check("get_ip", *rate_key(caller, caller.headers.get("x-darkmatter-agent-id")))
    show = caller.is_loopback or authenticated_as(node, caller, "/__darkmatter__/network_info") is not None
    peers = [{"agent_id": c["agent_id"], "agent_url": c.get("agent_url"), "agent_bio": c.get("agent_bio")}
             for c in node.connections.values()] if show else []
    return {"agent_id": node.agent_id, "display_name": node.state.get("display_name"),
            "public_key_hex": node.public_key_hex, "agent_url": agent_url_for(node, caller),
            "bio": node.state.get("bio"), "is_genesis": bool(node.state.get("is_genesis")),
            "accepting_connections": node.accepting_connections(), "protocol_version": PROTOCOL_VERSION,
            "peers": peers}


async def peer_lookup(node: Node, agent_id: str, caller: Caller) -> dict:
    node.rate.check("get_ip", *rate_key(caller, caller.headers.get("x-darkmatter-agent-id")))
    check_id(agent_id, "agent_id")
    conn = node.connections.get(agent_id)
    if conn is None:
        raise ProtocolError(404, "unknown_agent", "Not connected to that agent")
    return {"agent_id": agent_id, "url": conn.get("agent_url"), "status": "connected"}


def well_known(node: Node, caller: Caller) -> dict:
    base = node.config.public_url or agent_url_for(node, caller)
    status_ = node.public_status()
    return {"darkmatter": True, "protocol_version": PROTOCOL_VERSION, "agent_id": node.agent_id,
            "display_name": status_["display_name"], "public_key_hex": node.public_key_hex,
            "bio": status_["bio"], "status": status_["status"],
            "accepting_connections": status_["accepting_connections"],
            "mesh_url": base + "/__darkmatter__", "mcp_url": base + "/mcp",
            "webrtc_enabled": any(t.name == "webrtc" for t in node.transports),
            "is_genesis": status_["is_genesis"], "plugins": node.plugin_list()}


async def impression(node: Node, about: str, caller: Caller) -> dict:
    path = "/__darkmatter__/impression/" + about
    headers = caller.headers
    if not all(headers.get(k) for k in ("x-darkmatter-agent-id", "x-darkmatter-timestamp",
                                        "x-darkmatter-signature")):
        raise forbidden("Signed request required: impressions are shared only with connected agents (send "
                        "X-DarkMatter-Agent-Id, X-DarkMatter-Timestamp, X-DarkMatter-Signature)",
                        "signature_required")
    requester = headers["x-darkmatter-agent-id"]
    if requester not in node.connections or node.key_of(requester) is None:
        raise forbidden("Not connected", "not_connected")
    if not is_fresh(headers["x-darkmatter-timestamp"]):
        raise forbidden("Stale or missing timestamp", "stale_timestamp")
    if authenticated_as(node, caller, path) != requester:
        raise forbidden("Invalid signature", "invalid_signature")
    node.rate.check("impression", requester)
    check_id(about, "agent_id")
    text = node.state["impressions"].get(about)
    if isinstance(text, dict):
        text = text.get("text") or text.get("impression")
    if not text:
        return {"agent_id": about, "has_impression": False}
    return {"agent_id": about, "has_impression": True, "impression": text}


# --- peer_update (§6.3) ----------------------------------------------------------------------------


async def peer_update(node: Node, body: dict, caller: Caller) -> dict:
    if not body.get("agent_id") or not body.get("new_url"):
        raise ProtocolError(400, "missing_fields", "Missing agent_id or new_url")
    agent_id = check_id(body["agent_id"], "agent_id")
    new_url = check_peer_url(node, body["new_url"], "new_url")
    key_rate, scale = rate_key(caller, agent_id)
    node.rate.check("peer_update_ip", key_rate, scale)
    conn = node.connections.get(agent_id)
    if conn is None:
        raise ProtocolError(404, "unknown_agent", "Unknown agent")
    key = node.key_of(agent_id)
    presented = optional_key(body, "public_key_hex")
    if presented is not None and key is not None and presented != key:
        raise forbidden("Public key mismatch", "key_mismatch")
    if key is None:
        raise forbidden("This connection has no key; its URL cannot be updated")
    signature = body.get("signature")
    timestamp = body.get("timestamp")
    if not signature or not timestamp:
        raise forbidden("Signature required", "signature_required")
    signature = check_hex(signature, "signature", 128)
    get_str(body, "timestamp", max_len=64)
    # NOTE: compare the instants themselves; two ages computed one after the other made an exact replay of
    # the last accepted update look "later" than itself.
    last = parse_ts(conn.get("last_peer_update_ts"))
    sent_at = parse_ts(timestamp)
    if not is_fresh(timestamp) or (last is not None and sent_at is not None and sent_at <= last):
        raise forbidden("Stale timestamp", "stale_timestamp")
    if not verify(key, peer_update_string(agent_id, body["new_url"], timestamp), signature):
        raise forbidden("Invalid signature", "invalid_signature")
    if origin_key(new_url) == origin_key(conn["agent_url"]):
        conn["last_peer_update_ts"] = timestamp
        node.save_soon()
        return {"success": True, "updated": False}
    outcome = await healing.check_url(node, agent_id, new_url)
    if outcome == "unreachable":
        raise ProtocolError(422, "unverifiable_url", "The new URL could not be verified")
    if outcome != "ok":
        raise forbidden("The new URL serves another identity", "key_mismatch")
    # NOTE: the check above awaited the network; a later update (or a disconnect) may have landed meanwhile.
    # Applying this one now would move the URL and the last accepted timestamp back, and the newer update's
    # exact bytes would then be accepted again as a replay.
    if node.connections.get(agent_id) is not conn:
        raise ProtocolError(404, "unknown_agent", "Unknown agent")
    last = parse_ts(conn.get("last_peer_update_ts"))
    if last is not None and (sent_at is None or sent_at <= last):
        raise forbidden("Stale timestamp: a later update was accepted while this one was checked",
                        "stale_timestamp")
    before = {k: conn.get(k) for k in ("agent_url", "last_peer_update_ts", "health_failures")}
    conn["agent_url"] = new_url
    conn["last_peer_update_ts"] = timestamp
    conn["health_failures"] = 0
    await persist(node, lambda: conn.update(before))
    node.outbox.kick()  # deliveries waiting out a backoff meant for the old URL go now
    await node.emit("dm_on_connection_changed", agent_id=agent_id, event="url_changed")
    return {"success": True, "updated": True}


# --- challenge (§6.1) ------------------------------------------------------------------------------


async def challenge(node: Node, body: dict, caller: Caller) -> dict:
    """Prove possession of this node's key at the URL the challenger used: sign its fresh nonce.

    The URL signed is one of this node's own base URLs (the one the challenger addressed when it is ours),
    never a Host header as given: a relay in the middle forwarding the challenge gets its own URL refused."""
    node.rate.check("get_ip", *rate_key(caller, body.get("from_agent_id")))
    require(body, "agent_id", "from_agent_id", "nonce")
    agent_id = check_id(body["agent_id"], "agent_id")
    from_id = check_id(body["from_agent_id"], "from_agent_id")
    check_hex(body["nonce"], "nonce", 64)
    if agent_id != node.agent_id:
        raise ProtocolError(404, "unknown_agent", "This node is not that agent")
    addressed = agent_url_for(node, caller)
    url = addressed if node.is_own_url(addressed) else node.base_url
    timestamp = now_iso()
    return {"agent_id": node.agent_id, "url": url, "timestamp": timestamp,
            "signature_v2_hex": node.sign_v2("challenge", body["nonce"], agent_id, from_id, url, timestamp)}


# --- the one inbound entry (every transport calls this) ----------------------------------------------


async def well_known_op(node: Node, caller: Caller) -> dict:
    node.rate.check("get_ip", *rate_key(caller, None))
    return well_known(node, caller)


OPERATIONS: dict[str, Callable[..., Any]] = {
    "connection_request": connection_request, "connection_accepted": connection_accepted,
    "connection_rejected": connection_rejected, "disconnect": disconnect, "message": message,
    "peer_update": peer_update, "webhook_post": webhook_post, "webhook_get": webhook_get,
    "impression": impression, "peer_lookup": peer_lookup, "status": status, "network_info": network_info,
    "well_known": well_known_op, "challenge": challenge,
}

PREFIX = "/__darkmatter__/"
# (method, path, operation, path parameter): the HTTP shape of every operation (docs/protocol.md §4.1)
ROUTES: list[tuple[str, str, str, str | None]] = [
    ("POST", PREFIX + "connection_request", "connection_request", None),
    ("POST", PREFIX + "connection_accepted", "connection_accepted", None),
    ("POST", PREFIX + "connection_rejected", "connection_rejected", None),
    ("POST", PREFIX + "disconnect", "disconnect", None),
    ("POST", PREFIX + "message", "message", None),
    ("POST", PREFIX + "peer_update", "peer_update", None),
    ("POST", PREFIX + "challenge", "challenge", None),
    ("POST", PREFIX + "webhook/{message_id}", "webhook_post", "message_id"),
    ("GET", PREFIX + "webhook/{message_id}", "webhook_get", "message_id"),
    ("GET", PREFIX + "impression/{agent_id}", "impression", "agent_id"),
    ("GET", PREFIX + "peer_lookup/{agent_id}", "peer_lookup", "agent_id"),
    ("GET", PREFIX + "status", "status", None),
    ("GET", PREFIX + "network_info", "network_info", None),
    ("GET", "/.well-known/darkmatter.json", "well_known", None),
]
# Operations an inactive node refuses before reading the body (§2.1).
REFUSED_WHEN_INACTIVE = frozenset({"connection_request", "message"})


def route_of(method: str, path: str) -> tuple[str, str | None] | None:
    """The operation and path parameter a request's method and (unquoted) path address, or None."""
    for route_method, template, op, param in ROUTES:
        if route_method != method:
            continue
        if param is None:
            if path == template:
                return op, None
            continue
        prefix = template[: template.index("{")]
        rest = path[len(prefix):]
        if path.startswith(prefix) and rest and "/" not in rest:
            return op, rest
    return None


async def handle(node: Node, op: str, caller: Caller, body: dict | None = None, arg: str | None = None) -> dict:
    """Handle one inbound mesh operation, whatever transport carried it.

    ``op`` names the operation (a key of ``OPERATIONS``); ``body`` is the JSON object of a POST, ``arg``
    the path parameter of ``webhook_*`` (message_id), ``impression`` and ``peer_lookup`` (agent_id).
    Returns the 200 body or raises ``ProtocolError``; a state that cannot be saved is a 503."""
    handler = OPERATIONS.get(op)
    if handler is None:
        raise ProtocolError(404, "not_found", f"Unknown mesh operation {op!r}")
    args: list[Any] = [node]
    if arg is not None:
        args.append(arg)
    if op in POSTS:
        args.append(body if body is not None else {})
    try:
        return await handler(*args, caller)
    except OSError:
        raise save_failed() from None


POSTS = frozenset(op for method, _, op, _ in ROUTES if method == "POST")
