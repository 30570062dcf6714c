"""An example third-party DarkMatter plugin: a trust policy and a forwarding ranking.

Installed like any plugin (an entry point in the ``darkmatter`` group named ``trust_routing``), it
implements the two decision hooks:

* ``dm_trust_connection_request``: reject agent ids on ``DARKMATTER_TRUST_DENY``, accept those on
  ``DARKMATTER_TRUST_ALLOW``, and defer (return None) for everyone else, so the kernel default applies
  (genesis nodes accept, others queue the request for their agent).
* ``dm_rank_forwarding_candidates``: suggest connected peers for forwarding a message, best first:
  allow-listed peers, then peers whose bio shares the most words with the message, then the fastest
  responders. Deny-listed peers and peers failing health checks are never suggested.

Both hooks are synchronous, as decision hooks must be (an ``async def`` one would always "win").
"""

from __future__ import annotations

import re

from darkmatter import hookimpl

__version__ = "0.1.0"

DENY = "DARKMATTER_TRUST_DENY"
ALLOW = "DARKMATTER_TRUST_ALLOW"
MAX_HEALTH_FAILURES = "DARKMATTER_TRUST_MAX_HEALTH_FAILURES"

_WORD = re.compile(r"[a-z0-9]{4,}")


def _ids(node, name: str) -> set[str]:
    raw = node.config.get_str(name) or ""
    return {part.strip().lower() for part in raw.split(",") if part.strip()}


def _words(text: object) -> set[str]:
    return set(_WORD.findall(text.lower())) if isinstance(text, str) else set()


def _average_response_ms(conn: dict) -> float:
    sent = conn.get("messages_sent") or 0
    total = conn.get("total_response_time_ms") or 0
    return total / sent if sent and total else float("inf")


@hookimpl
def dm_trust_connection_request(node, request):
    agent_id = str(request.get("from_agent_id") or "").lower()
    if agent_id in _ids(node, DENY):
        return "reject"
    if agent_id in _ids(node, ALLOW):
        return "accept"
    return None  # not ours to decide: the next plugin or the kernel default


@hookimpl
def dm_rank_forwarding_candidates(node, message, candidates):
    if not candidates:
        return None
    deny, allow = _ids(node, DENY), _ids(node, ALLOW)
    limit = node.config.get_int(MAX_HEALTH_FAILURES, 3, minimum=1)
    topic = _words(message.get("content"))
    usable = [c for c in candidates
              if str(c.get("agent_id", "")).lower() not in deny and (c.get("health_failures") or 0) < limit]

    def score(conn: dict) -> tuple:
        agent_id = str(conn.get("agent_id", ""))
        overlap = len(topic & _words(conn.get("agent_bio")))
        return (agent_id.lower() not in allow, -overlap, _average_response_ms(conn), agent_id)

    return [c["agent_id"] for c in sorted(usable, key=score)]
