"""Kernel default decisions (trylast, so any plugin's answer wins) and the kernel's status lines."""

from __future__ import annotations

from darkmatter import hookimpl


@hookimpl(trylast=True)
def dm_trust_connection_request(node, request):
    """Genesis nodes auto-accept; everyone else queues the request for the agent to decide."""
    return "accept" if node.state.get("is_genesis") else "queue"


@hookimpl(trylast=True)
def dm_rank_forwarding_candidates(node, message, candidates):
    return []
