"""Token buckets for docs/protocol.md §13.1."""

from __future__ import annotations

import time
from dataclasses import dataclass

from darkmatter.wire import ProtocolError

# name: (capacity, refill tokens, per seconds)
DEFAULTS: dict[str, tuple[float, float, float]] = {
    "connection_request_ip": (5, 1, 60),
    "connection_request_node": (30, 30, 60),
    "message_peer": (30, 1, 2),
    "message_node": (200, 200, 60),
    "webhook_ip": (60, 60, 60),
    "peer_update_ip": (10, 10, 60),
    "get_ip": (120, 120, 60),
    "impression": (30, 30, 60),
    "webrtc_offer": (5, 5, 60),
}


def overrides_from_env(env) -> dict[str, tuple[float, float, float]]:
    """Per-row settings: ``DARKMATTER_RATE_<ROW>=<capacity>/<refill>/<seconds>``, e.g.
    ``DARKMATTER_RATE_MESSAGE_PEER=30/1/2`` (the defaults are in ``DEFAULTS``)."""
    from darkmatter.config import ConfigError

    rules: dict[str, tuple[float, float, float]] = {}
    for name in DEFAULTS:
        variable = "DARKMATTER_RATE_" + name.upper()
        raw = (env.get(variable) or "").strip()
        if not raw:
            continue
        parts = raw.split("/")
        try:
            capacity, refill, per = (float(p) for p in parts)
        except ValueError:
            raise ConfigError(f"{variable}={raw!r} must be capacity/refill/seconds, e.g. "
                              f"{'/'.join(str(int(v)) for v in DEFAULTS[name])}") from None
        if not (capacity >= 1 and refill > 0 and per > 0) or float("inf") in (capacity, refill, per):
            raise ConfigError(f"{variable}={raw!r}: capacity must be at least 1, refill and seconds above 0")
        rules[name] = (capacity, refill, per)
    return rules


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """``check(name, key)`` takes one token or raises 429 with Retry-After."""

    MAX_KEYS = 10000

    def __init__(self, enabled: bool = True, overrides: dict[str, tuple[float, float, float]] | None = None):
        self.enabled = enabled
        self.rules = {**DEFAULTS, **(overrides or {})}
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def check(self, name: str, key: str = "", scale: float = 1.0) -> None:
        if not self.enabled:
            return
        capacity, refill, per = self.rules[name]
        capacity *= scale
        rate = refill * scale / per
        now = time.monotonic()
        bucket = self._buckets.get((name, key))
        if bucket is None:
            if len(self._buckets) >= self.MAX_KEYS:
                self._prune(now)
            bucket = self._buckets[(name, key)] = _Bucket(capacity, now)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens < 1:
            retry = max(1, int((1 - bucket.tokens) / rate + 0.999))
            raise ProtocolError(429, "rate_limited", "Rate limit exceeded", retry_after=retry)
        bucket.tokens -= 1

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled (that changes nothing); if too many remain, forget the least
        recently used half of the per-key ones. Node-wide buckets (key "") are never forgotten: clearing
        them would lift the node-wide limits for anyone who can mint MAX_KEYS keys (claimed agent ids)."""
        for key, bucket in list(self._buckets.items()):
            capacity, refill, per = self.rules[key[0]]
            if bucket.tokens + (now - bucket.stamp) * refill / per >= capacity:
                del self._buckets[key]
        if len(self._buckets) >= self.MAX_KEYS:
            keyed = sorted((k for k in self._buckets if k[1]), key=lambda k: self._buckets[k].stamp)
            for key in keyed[: len(keyed) // 2 + 1]:
                del self._buckets[key]
