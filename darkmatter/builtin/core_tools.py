"""MCP tools for the four primitives and what sits on them: connections, messages, impressions."""

from __future__ import annotations

import dataclasses
import time

from darkmatter import channel, hookimpl
from darkmatter.mesh import outbound as actions
from darkmatter.mesh import receipts
from darkmatter.mesh.connections import MAX_CONNECTIONS
from darkmatter.mesh.healing import fetch_well_known
from darkmatter.mesh.webhooks import hops_remaining
from darkmatter.tools import Tool, ToolError, boolean, integer, obj, string
from darkmatter.wire import MAX_CONTENT_BYTES, MAX_IMPRESSION, MAX_NOTE, ProtocolError, check_url, normalize

AGENT_ID = string("The agent_id of one of your connections (see darkmatter_list_connections).",
                  min_length=1, max_length=128)
MESSAGE_ID = string("A message id, e.g. msg-…", min_length=1, max_length=128)


def _preview(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _words(text: str | None, limit: int) -> str | None:
    """At most ``limit`` words of ``text`` (the original's ``bio_summary``)."""
    if not text:
        return None
    words = text.split()
    return text if len(words) <= limit else " ".join(words[:limit]) + "..."


# NOTE: results keep every top-level key (and list-entry key) of the original implementation's tools
# (protocol 0.2) with its meaning, beside what 0.3 adds; tests/compat/test_tool_contract.py holds the list.


def connection_view(node, conn: dict) -> dict:
    failures = conn.get("health_failures") or 0
    return {"agent_id": conn["agent_id"], "agent_url": conn.get("agent_url"),
            "display_name": conn.get("agent_display_name"), "bio": conn.get("agent_bio"),
            "direction": conn.get("direction"), "connected_at": conn.get("connected_at"),
            "messages_sent": conn.get("messages_sent", 0), "messages_received": conn.get("messages_received", 0),
            "messages_declined": conn.get("messages_declined", 0),
            "avg_response_time_ms": actions.response_time_ms(conn), "last_activity": conn.get("last_activity"),
            "health": "ok" if failures == 0 else ("degraded" if failures < 3 else "unreachable"),
            "health_failures": failures, "agent_public_key_hex": conn.get("agent_public_key_hex"),
            "protocol_version": conn.get("protocol_version"), "transport": conn.get("transport", "http"),
            # the original's names for the same facts
            "agent_bio": conn.get("agent_bio"), "bio_summary": _words(conn.get("agent_bio"), 250),
            "crypto": conn.get("agent_public_key_hex") is not None}


def inbox_view(entry: dict, full: bool = False) -> dict:
    view = {k: entry.get(k) for k in ("message_id", "from_agent_id", "hops_remaining", "received_at",
                                      "verified", "signature_version", "forwarded_to", "metadata")}
    view["content"] = entry["content"] if full else _preview(entry["content"])
    view["webhook"] = entry.get("webhook")
    view["can_forward"] = (entry.get("hops_remaining") or 0) > 0
    view["unread"] = entry.get("read_at") is None
    if entry.get("outside_mesh"):
        view["outside_mesh"] = True  # came in through a bridge (e.g. A2A): unverified, answered by respond only
    return view


def sent_view(sent: dict, full: bool = False) -> dict:
    view = {"message_id": sent["message_id"], "status": sent.get("status"), "created_at": sent.get("created_at"),
            "initial_hops": sent.get("initial_hops"), "hops_remaining": hops_remaining(sent),
            "routed_to": sent.get("routed_to", []), "response_count": len(sent.get("responses", [])),
            "content": sent.get("content", "") if full else _preview(sent.get("content", "")),
            "webhook": sent.get("webhook"), "updates_count": len(sent.get("updates", [])),
            "forwarding_count": sum(1 for u in sent.get("updates", []) if u.get("type") == "forwarded"),
            "recipients": receipts.recipient_states(sent)}
    if full:
        view.update(updates=sent.get("updates", []), responses=sent.get("responses", []),
                    receipts=sent.get("receipts", []),
                    response=sent.get("response"), deliveries=sent.get("deliveries", {}),
                    metadata=sent.get("metadata", {}))
    return view


# --- handlers -----------------------------------------------------------------------------------


async def request_connection(node, args, session):
    result = await actions.request_connection(node, args["target_url"])
    conn = node.connections.get(result.get("agent_id") or "")
    if result.get("status") == "connected" and conn is not None:
        result.setdefault("agent_bio", conn.get("agent_bio"))
    return result


async def respond_connection(node, args, session):
    accept = bool(args["accept"])
    result = await actions.respond_connection(node, args["request_id"], accept)
    result.setdefault("accepted", accept)
    return result


async def disconnect(node, args, session):
    result = await actions.disconnect(node, args["agent_id"])
    result.setdefault("disconnected_from", args["agent_id"])
    return result


async def send_message(node, args, session):
    hops = args.get("hops_remaining", 10)
    result = await actions.send_message(node, args["content"], args.get("target_agent_id") or None,
                                        args.get("metadata"), hops)
    result.setdefault("hops_remaining", hops)
    failed = [{"agent_id": agent_id, "display_name": (node.connections.get(agent_id) or {}).get("agent_display_name"),
               "error": d.get("last_error")}
              for agent_id, d in (result.get("deliveries") or {}).items() if d.get("state") == "failed"]
    if failed:
        result.setdefault("failed", failed)
        if not result.get("success"):
            result.setdefault("error", f"Message could not be delivered to any of {len(failed)} target(s). "
                                       "Check 'failed' for details.")
    return result


async def respond_message(node, args, session):
    entry = next((m for m in node.state["inbox"] if m.get("message_id") == args["message_id"]), None)
    conn = node.connections.get((entry or {}).get("from_agent_id") or "") or {}
    total_before = conn.get("total_response_time_ms") or 0.0
    started = time.monotonic()
    result = await actions.respond_message(node, args["message_id"], args["response"], args.get("metadata"))
    # the original's response_time_ms: how long the webhook POST took (0 when it did not get through)
    latency = (conn.get("total_response_time_ms") or 0.0) - total_before
    if result.get("delivery") != "delivered":
        latency = 0.0
    elif latency <= 0:
        latency = (time.monotonic() - started) * 1000
    result.setdefault("webhook_called", (entry or {}).get("webhook"))
    result.setdefault("response_time_ms", round(latency, 2))
    result.setdefault("error", None if result.get("success") else result.get("last_error"))
    return result


async def forward_message(node, args, session):
    note = args.get("note")
    result = await actions.forward_message(node, args["message_id"], args["target_agent_id"], note,
                                           bool(args.get("force", False)))
    result.setdefault("forwarded_to", args["target_agent_id"])
    result.setdefault("hops_remaining_for_target", result.get("hops_remaining"))
    result.setdefault("note", note)
    result.setdefault("hint", "Message stays in your inbox — you can forward to more agents (forking) or use "
                              "darkmatter_respond_message to remove it.")
    return result


async def get_message(node, args, session):
    entry = actions._inbox_entry(node, args["message_id"])
    candidates = [c for c in node.connections.values()
                  if c["agent_id"] not in (entry["from_agent_id"], node.agent_id)]
    ranked = node.pm.hook.dm_rank_forwarding_candidates(node=node, message=dict(entry), candidates=candidates)
    receipts.advance(node, entry, "read")
    view = inbox_view(entry, full=True)
    view["suggested_forward_targets"] = [a for a in (ranked or []) if a in node.connections]
    return view


async def list_inbox(node, args, session):
    inbox = node.state["inbox"]
    if session.scope is not None:  # a spawned agent's session sees only its own message (§12.6)
        inbox = [m for m in inbox if m.get("message_id") == session.scope]
    limit = args.get("limit", 50)
    views = [inbox_view(m) for m in inbox[:limit]]
    for entry in inbox[:limit]:  # listed with its content: surfaced (§5.8)
        receipts.advance(node, entry, "surfaced")
    unread = len(channel.unread(node)) if session.scope is None else sum(1 for m in inbox if m.get("read_at") is None)
    return {"total": len(inbox), "unread": unread, "messages": views}


async def wait_for_message(node, args, session):
    sender = args.get("from_agent_id") or None
    if session.scope is not None:  # a spawned agent's session: its own message, if still there (§12.6)
        found = [m for m in node.state["inbox"] if m.get("message_id") == session.scope]
        for entry in found:
            receipts.advance(node, entry, "surfaced")
    else:
        found = await node.mcp.channel.wait(args.get("timeout_seconds", 60), sender)
    views = []
    for entry in found:
        view = inbox_view(entry)
        view["content"], view["content_truncated"] = channel.cap_utf8(entry["content"])
        views.append(view)
    return {"timed_out": not found, "messages": views,
            "hint": "Open a message with darkmatter_get_message (it then counts as read), answer it with "
                    "darkmatter_respond_message or pass it on with darkmatter_forward_message." if found else
                    "No message arrived; call again to keep waiting."}


async def list_messages(node, args, session):
    sent = sorted(node.state["sent_messages"].values(), key=lambda s: s.get("created_at") or "", reverse=True)
    status = args.get("status")
    if status:
        sent = [s for s in sent if s.get("status") == status]
    limit = args.get("limit", 50)
    return {"total": len(sent), "messages": [sent_view(s) for s in sent[:limit]]}


async def get_sent_message(node, args, session):
    sent = node.state["sent_messages"].get(args["message_id"])
    if sent is None:
        raise ToolError(f"No sent message {args['message_id']!r}. See darkmatter_list_messages.")
    return sent_view(sent, full=True)


async def expire_message(node, args, session):
    return await actions.expire_message(node, args["message_id"])


async def list_connections(node, args, session):
    conns = [connection_view(node, c) for c in node.connections.values()]
    for view in conns:
        impression = node.state["impressions"].get(view["agent_id"])
        if impression:
            view["impression"] = _words(impression, 500)
    return {"total": len(conns), "max_connections": MAX_CONNECTIONS, "connections": conns}


async def list_pending_requests(node, args, session):
    pending = [{"request_id": rid, **{k: v for k, v in entry.items() if k != "request_id"},
                "crypto": entry.get("from_agent_public_key_hex") is not None}
               for rid, entry in node.state["pending_requests"].items()]
    outbound = [{"target": p["target_base"], "expected_agent_id": p.get("expected_agent_id"),
                 "created_at": p.get("created_at")} for p in node.state["pending_outbound"]]
    # "total" and "requests" are the original's; "incoming" is the same list under its 0.3 name
    return {"total": len(pending), "requests": pending, "incoming": pending, "outgoing": outbound,
            "notices": node.state["notices"][-20:]}


def accepting_connections(node) -> bool:
    return node.state.get("status", "active") == "active" and len(node.connections) < MAX_CONNECTIONS


async def network_info(node, args, session):
    conns = list(node.connections.values())
    return {"agent_id": node.agent_id, "agent_url": node.base_url, "display_name": node.state.get("display_name"),
            "bio": node.state.get("bio"), "public_key_hex": node.public_key_hex,
            "accepting_connections": accepting_connections(node), "is_genesis": bool(node.state.get("is_genesis")),
            "peers": [{"agent_id": c["agent_id"], "agent_url": c.get("agent_url"), "agent_bio": c.get("agent_bio"),
                       "display_name": c.get("agent_display_name")} for c in conns],
            "connections": [{"agent_id": c["agent_id"], "agent_url": c.get("agent_url"),
                             "display_name": c.get("agent_display_name")} for c in conns],
            "discovered_peers": list(node.discovered.values()), "discovery_enabled": node.config.discovery}


async def discover_domain(node, args, session):
    domain = args["domain"].strip()
    candidates = [domain] if "://" in domain else [f"https://{domain}", f"http://{domain}"]
    errors = []
    for url in candidates:
        try:
            base = normalize(check_url(url, "domain"))
        except ProtocolError as exc:
            raise ToolError(f"Invalid domain {domain!r}: {exc.error}") from None
        doc = await fetch_well_known(node, base, strict=False)
        if doc is not None:
            # the original answered {"found": true, **document}: keep the document's keys
            return {**doc, "found": True, "url": base, "agent_id": doc.get("agent_id"),
                    "display_name": doc.get("display_name"), "bio": doc.get("bio"),
                    "accepting_connections": doc.get("accepting_connections"),
                    "protocol_version": doc.get("protocol_version"), "mesh_url": doc.get("mesh_url")}
        errors.append(base)
    message = "No DarkMatter node answered at that domain."
    return {"found": False, "tried": errors, "message": message, "error": message}


async def set_impression(node, args, session):
    text = args["impression"]
    if len(text) > MAX_IMPRESSION:
        raise ToolError(f"An impression is at most {MAX_IMPRESSION} characters.")
    existed = args["agent_id"] in node.state["impressions"]
    node.state["impressions"][args["agent_id"]] = text
    await node.save()
    return {"success": True, "agent_id": args["agent_id"], "action": "updated" if existed else "created",
            "impression": text}


async def get_impression(node, args, session):
    text = node.state["impressions"].get(args["agent_id"])
    return {"agent_id": args["agent_id"], "has_impression": bool(text), "impression": text}


async def delete_impression(node, args, session):
    existed = node.state["impressions"].pop(args["agent_id"], None) is not None
    await node.save()
    return {"success": True, "deleted": existed, "agent_id": args["agent_id"],
            "action": "deleted" if existed else "none"}


async def ask_impression(node, args, session):
    result = await actions.ask_impression(node, args["ask_agent_id"], args["about_agent_id"])
    return {"success": True, "asked": args["ask_agent_id"], **result}


TOOLS = [
    Tool("darkmatter_request_connection", "Ask another DarkMatter node to connect. Give its URL (base URL, "
         "…/mcp or …/__darkmatter__ all work). Returns connected, pending (the other agent decides) or failed.",
         request_connection, {"target_url": string("URL of the node to connect to, e.g. http://127.0.0.1:8101",
                                                   max_length=2048)}, ("target_url",), open_world=True),
    Tool("darkmatter_respond_connection", "Accept or reject a pending incoming connection request "
         "(see darkmatter_list_pending_requests).", respond_connection,
         {"request_id": string("The request id, e.g. req-…", max_length=128),
          "accept": boolean("true to accept, false to reject")}, ("request_id", "accept"), open_world=True),
    Tool("darkmatter_disconnect", "Remove a connection and tell the peer. Impressions are kept.", disconnect,
         {"agent_id": AGENT_ID}, ("agent_id",), destructive=True, idempotent=True, open_world=True),
    Tool("darkmatter_send_message", "Send a message to one connection, or to all connections when "
         "target_agent_id is omitted. Recipients may answer through the webhook or forward it onward; "
         "follow it with darkmatter_get_sent_message.", send_message,
         {"content": string(f"The message text (at most {MAX_CONTENT_BYTES} UTF-8 bytes).", min_length=1),
          "target_agent_id": string("Recipient agent_id; omit to broadcast to every connection.", max_length=128),
          "metadata": obj("Optional JSON object carried with the message (at most 16 KiB)."),
          "hops_remaining": integer("How many more forwards are allowed.", minimum=1, maximum=50, default=10)},
         ("content",), open_world=True),
    Tool("darkmatter_respond_message", "Answer a message in your inbox; the answer goes to the sender's "
         "webhook and the message leaves your inbox.", respond_message,
         {"message_id": MESSAGE_ID, "response": string("Your answer.", min_length=1),
          "metadata": obj("Optional JSON object; defaults to the message's metadata.")},
         ("message_id", "response"), open_world=True),
    Tool("darkmatter_get_message", "Read one inbox message in full, with suggested forwarding targets.",
         get_message, {"message_id": MESSAGE_ID}, ("message_id",), read_only=True, idempotent=True),
    Tool("darkmatter_forward_message", "Forward an inbox message to another connection (one hop less). "
         "Refuses loops unless force is true; the message stays in your inbox so you can fork or answer.",
         forward_message, {"message_id": MESSAGE_ID, "target_agent_id": AGENT_ID,
                           "note": string("Optional note for the sender's trail.", max_length=MAX_NOTE),
                           "force": boolean("Forward even if the target already saw it.", default=False)},
         ("message_id", "target_agent_id"), open_world=True),
    Tool("darkmatter_wait_for_message", "Wait for a message: returns your unread inbox messages at once, "
         "otherwise blocks until the next one arrives or timeout_seconds pass (then timed_out is true). For MCP "
         "clients without channel notifications. A message stays unread until you open it with "
         "darkmatter_get_message. Content is untrusted text written by another agent.", wait_for_message,
         {"timeout_seconds": integer("How long to wait at most, in seconds.", minimum=0, maximum=channel.WAIT_MAX,
                                     default=60),
          "from_agent_id": string("Only messages from this agent_id.", min_length=1, max_length=128)}, (),
         read_only=True),
    Tool("darkmatter_list_inbox", "List messages waiting in your inbox (previews; unread marks those not yet "
         "opened with darkmatter_get_message).", list_inbox,
         {"limit": integer("At most this many.", minimum=1, maximum=500, default=50)}, (), read_only=True,
         idempotent=True),
    Tool("darkmatter_list_messages", "List messages you sent, newest first, with how far each recipient got: "
         "queued, delivered, surfaced (shown to its agent), read, responded (or failed).", list_messages,
         {"status": string("Only this status.", enum=["active", "responded", "expired"]),
          "limit": integer("At most this many.", minimum=1, maximum=100, default=50)}, (), read_only=True,
         idempotent=True),
    Tool("darkmatter_get_sent_message", "One sent message in full: deliveries, how far each recipient got "
         "(queued, delivered, surfaced, read, responded), forwarding trail, receipts, responses.",
         get_sent_message, {"message_id": MESSAGE_ID}, ("message_id",), read_only=True, idempotent=True),
    Tool("darkmatter_expire_message", "Mark one of your sent messages expired so nobody forwards it further. "
         "For an inbox message from outside the mesh (outside_mesh, e.g. A2A), decline it instead.",
         expire_message, {"message_id": MESSAGE_ID}, ("message_id",), destructive=True, idempotent=True),
    Tool("darkmatter_list_connections", "Your connections with telemetry, health, key, protocol version "
         "and transport.", list_connections, {}, (), read_only=True, idempotent=True),
    Tool("darkmatter_list_pending_requests", "Incoming connection requests awaiting your decision, your "
         "outgoing ones, and recent notices (rejections, disconnects).", list_pending_requests, {}, (),
         read_only=True, idempotent=True),
    Tool("darkmatter_network_info", "This node's URL, connections and discovered peers.", network_info, {}, (),
         read_only=True, idempotent=True),
    Tool("darkmatter_discover_domain", "Look for a DarkMatter node at a domain through its "
         "/.well-known/darkmatter.json (https first, then http).", discover_domain,
         {"domain": string("A domain or URL, e.g. example.com or http://127.0.0.1:8101", max_length=2048)},
         ("domain",), read_only=True, idempotent=True, open_world=True),
    Tool("darkmatter_set_impression", "Record your impression (trust notes) of an agent. Shared only with "
         "your connections when they ask.", set_impression,
         {"agent_id": string("The agent the impression is about.", max_length=128),
          "impression": string("Your impression.", max_length=MAX_IMPRESSION)}, ("agent_id", "impression"),
         idempotent=True),
    Tool("darkmatter_get_impression", "Your own impression of an agent.", get_impression,
         {"agent_id": string("The agent.", max_length=128)}, ("agent_id",), read_only=True, idempotent=True),
    Tool("darkmatter_delete_impression", "Forget your impression of an agent.", delete_impression,
         {"agent_id": string("The agent.", max_length=128)}, ("agent_id",), destructive=True, idempotent=True),
    Tool("darkmatter_ask_impression", "Ask one of your connections what it thinks of another agent.",
         ask_impression, {"ask_agent_id": string("The connection to ask (see darkmatter_list_connections).",
                                                 min_length=1, max_length=128),
                          "about_agent_id": string("The agent you want an opinion on.", max_length=128)},
         ("ask_agent_id", "about_agent_id"), read_only=True, open_world=True,
         aliases={"agent_id": "ask_agent_id"}),
]


@hookimpl
def dm_register_tools(register, node):
    for tool in TOOLS:
        register(dataclasses.replace(tool))


@hookimpl
def dm_status_lines(node):
    lines = []
    pending = len(node.state.get("pending_requests", {}))
    inbox = len(node.state.get("inbox", []))
    if pending:
        lines.append(f"ACTION: {pending} connection request(s) waiting — darkmatter_list_pending_requests, "
                     "then darkmatter_respond_connection.")
    if inbox:
        lines.append(f"ACTION: {inbox} message(s) in your inbox — darkmatter_list_inbox, then respond or forward.")
    if not node.connections:
        lines.append("ACTION: no connections yet — darkmatter_discover_local or darkmatter_request_connection.")
    if node.bio_is_generic():
        lines.append("ACTION: your bio is generic — darkmatter_update_bio so peers know what you do.")
    if not node.is_active:
        lines.append("ACTION: you are inactive and refuse messages — darkmatter_set_status to accept them.")
    failed = sum(1 for s in node.state.get("sent_messages", {}).values()
                 for d in s.get("deliveries", {}).values() if d.get("state") == "failed")
    if failed:
        lines.append(f"{failed} delivery(ies) failed — see darkmatter_list_messages.")
    unread_sent = receipts.unread_sent(node)
    if unread_sent:
        lines.append(f"{unread_sent} message(s) you sent not yet read by a recipient — darkmatter_list_messages "
                     "shows how far each got.")
    return lines


@hookimpl
def dm_on_message_received(node, message):
    mcp = getattr(node, "mcp", None)
    if mcp is not None:
        mcp.channel.arrived(message)
