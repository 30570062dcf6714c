"""What the console shows: one JSON-shaped snapshot of the node, built from its state (docs/protocol.md §11).

Peer-controlled text (names, bios, message content, responses, notes) is passed through as data, length-capped;
the page only ever puts it into the DOM as text. Secrets (the private key, the bearer token) never enter it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from darkmatter.api import PROTOCOL_VERSION, __version__, live_status, parse_ts

PREVIEW = 2000  # characters of a message, response or bio shown before "open"
SENT_SHOWN = 50
NOTICES_SHOWN = 20


def cap(text: Any, limit: int = PREVIEW) -> str | None:
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "…"


def health(conn: dict) -> str:
    failures = conn.get("health_failures") or 0
    return "ok" if failures == 0 else ("degraded" if failures < 3 else "unreachable")


def last_contact(conn: dict) -> float | None:
    """Epoch seconds of the latest sign of life: a health check (``last_contact``) or traffic (``last_activity``)."""
    times = []
    contact = conn.get("last_contact")
    if isinstance(contact, (int, float)):
        times.append(float(contact))
    activity = parse_ts(conn.get("last_activity")) if conn.get("last_activity") else None
    if activity is not None:
        times.append(activity.timestamp())
    return round(max(times)) if times else None


def _ports(ports: list[int]) -> str:
    """8100..8110 -> "8100-8110"."""
    runs: list[list[int]] = []
    for port in sorted(ports):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def settings(node: Any) -> list[dict]:
    """The settings that are safe to show (no keys, no token)."""
    cfg = node.config
    rows = [
        ("DARKMATTER_PORT", node.port),
        ("DARKMATTER_HOST", cfg.host),
        ("DARKMATTER_PUBLIC_URL", cfg.public_url or "unset"),
        ("DARKMATTER_GENESIS", "true (auto-accepts connection requests)" if node.state.get("is_genesis")
         else "false (requests wait for your decision)"),
        ("DARKMATTER_TRANSPORT", cfg.transport),
        ("DARKMATTER_DISCOVERY", str(cfg.discovery).lower()),
        ("DARKMATTER_DISCOVERY_PORTS", _ports(cfg.discovery_ports)),
        ("DARKMATTER_INBOX_MAX", cfg.inbox_max),
        ("DARKMATTER_DELIVERY_RETRY_SECONDS", f"{cfg.delivery_retry_seconds:g}"),
        ("DARKMATTER_RATE_LIMITS", "on" if cfg.rate_limits else "off"),
        ("DARKMATTER_UPNP", str(cfg.upnp).lower()),
        ("DARKMATTER_BOOTSTRAP", str(cfg.bootstrap).lower()),
        ("DARKMATTER_PLUGINS", "every installed plugin" if cfg.plugins is None else (cfg.plugins or '""')),
        ("DARKMATTER_DISABLE_PLUGINS", ",".join(cfg.disable) or "none"),
        ("DARKMATTER_STORAGE", cfg.storage),
        ("DARKMATTER_STATE_FILE", str(cfg.state_file)),
    ]
    return [{"name": name, "value": str(value)} for name, value in rows]


def _receipts(sent: dict) -> list[dict]:
    """Delivery receipts (docs/protocol.md §5.8) as ``[{agent_id, state}]``, whatever shape the kernel keeps."""
    raw = sent.get("receipts")
    out: list[dict] = []
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, dict) and isinstance(item.get("agent_id"), str):
                out.append({"agent_id": item["agent_id"], "state": str(item.get("state") or "")})
    elif isinstance(raw, dict):
        for agent_id, value in raw.items():
            states = value if isinstance(value, list) else [value]
            for state in states:
                if isinstance(state, dict):
                    state = state.get("state")
                if state:
                    out.append({"agent_id": str(agent_id), "state": str(state)})
    return out


def sent_view(sent: dict) -> dict:
    return {
        "message_id": sent.get("message_id"),
        "content": cap(sent.get("content")),
        "status": sent.get("status") or "active",
        "created_at": sent.get("created_at"),
        "initial_hops": sent.get("initial_hops"),
        "routed_to": [a for a in sent.get("routed_to") or [] if isinstance(a, str)],
        "deliveries": {agent: {"state": d.get("state"), "attempts": d.get("attempts"),
                               "last_error": cap(d.get("last_error"), 300), "transport": d.get("transport")}
                       for agent, d in (sent.get("deliveries") or {}).items() if isinstance(d, dict)},
        "updates": [{"type": u.get("type"), "agent_id": u.get("agent_id"), "target_agent_id": u.get("target_agent_id"),
                     "note": cap(u.get("note"), 300), "timestamp": u.get("timestamp"), "verified": u.get("verified")}
                    for u in sent.get("updates") or [] if isinstance(u, dict)],
        "responses": [{"agent_id": r.get("agent_id"), "response": cap(r.get("response")),
                       "timestamp": r.get("timestamp"), "verified": r.get("verified"),
                       "after_expiry": r.get("after_expiry")}
                      for r in sent.get("responses") or [] if isinstance(r, dict)],
        "receipts": _receipts(sent),
    }


def inbox_view(entry: dict) -> dict:
    content = entry.get("content") or ""
    return {
        "message_id": entry.get("message_id"),
        "from_agent_id": entry.get("from_agent_id"),
        "content": cap(content),
        "truncated": len(content) > PREVIEW,
        "received_at": entry.get("received_at"),
        "hops_remaining": entry.get("hops_remaining"),
        "verified": bool(entry.get("verified")),
        # NOTE: a `read` flag is kept by kernels with read state (inbox entries without it are unread).
        "read": bool(entry.get("read")),
        "forwarded_to": list(entry.get("forwarded_to") or []),
        "transport": entry.get("transport"),
    }


def snapshot(node: Any) -> dict:
    state = node.state
    impressions = state.get("impressions") or {}
    connections = []
    for conn in state.get("connections", {}).values():
        connections.append({
            "agent_id": conn.get("agent_id"),
            "display_name": cap(conn.get("agent_display_name"), 100),
            "url": conn.get("agent_url"),
            "bio": cap(conn.get("agent_bio"), 1000),
            "direction": conn.get("direction"),
            "transport": conn.get("transport") or "http",
            "health": health(conn),
            "health_failures": conn.get("health_failures") or 0,
            "last_contact": last_contact(conn),
            "connected_at": conn.get("connected_at"),
            "messages_sent": conn.get("messages_sent", 0),
            "messages_received": conn.get("messages_received", 0),
            "protocol_version": conn.get("protocol_version"),
            "public_key_hex": conn.get("agent_public_key_hex"),
            "impression": cap(impressions.get(conn.get("agent_id")), 1000),
        })
    connected = {c["agent_id"] for c in connections}
    try:
        loop_now = asyncio.get_running_loop().time()
    except RuntimeError:
        loop_now = None
    discovered = []
    for entry in list(node.discovered.values()):
        if entry.get("agent_id") in connected:
            continue
        seen = entry.get("last_seen")
        seen_at = None
        if loop_now is not None and isinstance(seen, (int, float)):
            seen_at = round((time.time() - (loop_now - seen)) / 5) * 5  # coarse: a stable snapshot
        discovered.append({"agent_id": entry.get("agent_id"), "url": entry.get("url"),
                           "display_name": cap(entry.get("display_name"), 100), "bio": cap(entry.get("bio"), 1000),
                           "source": entry.get("source"), "last_seen": seen_at,
                           "accepting_connections": entry.get("accepting_connections"),
                           "impression": cap(impressions.get(entry.get("agent_id")), 1000)})
    incoming = [{"request_id": request_id, "from_agent_id": r.get("from_agent_id"),
                 "url": r.get("from_agent_url"), "display_name": cap(r.get("from_agent_display_name"), 100),
                 "bio": cap(r.get("from_agent_bio"), 1000), "requested_at": r.get("requested_at"),
                 "signed": bool(r.get("signed"))}
                for request_id, r in (state.get("pending_requests") or {}).items()]
    outgoing = [{"target": p.get("target_base"), "expected_agent_id": p.get("expected_agent_id"),
                 "created_at": p.get("created_at")} for p in state.get("pending_outbound") or []]
    inbox = [inbox_view(e) for e in state.get("inbox") or []]
    # Unread first; newest first within each group.
    inbox.sort(key=lambda m: m.get("received_at") or "", reverse=True)
    inbox.sort(key=lambda m: m["read"])
    sent = sorted((state.get("sent_messages") or {}).values(), key=lambda s: s.get("created_at") or "",
                  reverse=True)[:SENT_SHOWN]
    return {
        "node": {"agent_id": node.agent_id, "display_name": state.get("display_name"), "bio": cap(state.get("bio"), 1000),
                 "url": node.base_url, "port": node.port, "status": state.get("status"),
                 "is_genesis": bool(state.get("is_genesis")), "protocol_version": PROTOCOL_VERSION,
                 "version": __version__, "accepting_connections": node.accepting_connections()},
        "connections": connections,
        "discovered": discovered,
        "pending": {"incoming": incoming, "outgoing": outgoing},
        "inbox": inbox,
        "sent": [sent_view(s) for s in sent],
        "notices": [{k: cap(v, 300) if isinstance(v, str) else v for k, v in n.items()}
                    for n in (state.get("notices") or [])[-NOTICES_SHOWN:] if isinstance(n, dict)],
        "plugins": node.plugin_list(),
        "settings": settings(node),
        "status": live_status(node),
    }
