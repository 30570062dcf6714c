"""Checks the inbound operations share: peer URLs, optional keys and signatures, signed-and-fresh, the
self-certifying rules, and the rate-limit key of a caller (docs/protocol.md §2.6, §3, §13.1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from darkmatter.identity import verify
from darkmatter.mesh.dispatch import transport_for
from darkmatter.mesh.transport import Caller
from darkmatter.wire import (bad, check_hex, check_url, forbidden, host_of, is_fresh, is_self_certifying,
                             literal_class, normalize)

if TYPE_CHECKING:
    from darkmatter.node import Node


def check_peer_url(node: Node, value: Any, field_name: str) -> str:
    """A peer URL (§2.6): valid, normalized, reachable by one of this node's transports, and not a literal
    address of the 'never' class."""
    url = normalize(check_url(value, field_name))
    if literal_class(host_of(url)) == "never":
        raise bad(f"Field '{field_name}' points to an address that is never allowed")
    if transport_for(node, url) is None:
        raise bad(f"Field '{field_name}' uses a URL scheme this node has no transport for")
    return url


def optional_key(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value in (None, ""):
        return None
    return check_hex(value, name, 64)


def optional_sig(body: dict, name: str = "signature_v2_hex") -> str | None:
    value = body.get(name)
    if value in (None, ""):
        return None
    return check_hex(value, name, 128)


def check_signed(key: str | None, text: str, signature: str | None, timestamp: Any) -> None:
    """Fresh timestamp and valid signature, else 403 with the §2.2 code."""
    if not is_fresh(timestamp):
        raise forbidden("Stale or missing timestamp", "stale_timestamp")
    if not key or not verify(key, text, signature):
        raise forbidden("Invalid signature", "invalid_signature")


def self_certifying_rules(agent_id: str, key: str | None, signature: str | None) -> None:
    """§3.2/§4.3: a 64-hex id must equal its key and must sign."""
    if is_self_certifying(agent_id):
        if key is not None and key != agent_id:
            raise forbidden("Public key mismatch: a self-certifying agent_id must equal its key", "key_mismatch")
        if signature is None:
            raise forbidden("Signature required for a self-certifying agent_id", "signature_required")


def rate_key(caller: Caller, claimed: Any) -> tuple[str, float]:
    """§13.1: loopback sources are keyed by the claimed agent id, else get ten times the capacity. §2.1: a
    proxied request is keyed by the client a trusted proxy names, else shares one bucket with every other
    proxied request (a claimed id or header is no key: anyone can mint them)."""
    if caller.proxied:
        return ("ip:" + caller.forwarded_for, 1.0) if caller.forwarded_for else ("proxied", 1.0)
    if caller.is_loopback:
        if isinstance(claimed, str) and claimed:
            return "id:" + claimed[:128], 1.0
        return "ip:" + caller.ip, 10.0
    return "ip:" + caller.ip, 1.0
