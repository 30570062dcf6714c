"""Transports carry envelopes to connections; the kernel picks one per delivery (STYLE §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class TransportUnavailable(Exception):
    """This transport cannot carry the envelope now; the kernel tries the next one."""


@dataclass
class Reply:
    """What a peer answered: HTTP-like status and JSON body, or an error before any answer.

    ``status`` is None when no answer arrived; ``error_kind`` is then ``connect`` (connect error, DNS
    failure, connect timeout: triggers healing) or ``timeout`` / ``reset`` / ``blocked`` / ``other``.
    """

    status: int | None
    body: Any = None
    error: str | None = None
    error_kind: str | None = None
    transport: str = "http"
    elapsed_ms: float = 0.0
    retry_after: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """§2.2: only a 2xx JSON object without ``error`` is success."""
        return (self.status is not None and 200 <= self.status < 300 and isinstance(self.body, dict)
                and "error" not in self.body)

    @property
    def classification(self) -> str:
        """§5.2: ``delivered``, ``failed`` or ``transient``."""
        if self.ok:
            return "delivered"
        if self.status is None:
            return "failed" if self.error_kind in ("blocked", "invalid") else "transient"
        if self.status in (408, 425, 429) or self.status >= 500:
            return "transient"
        return "failed"

    def describe(self) -> str:
        if self.status is None:
            return self.error or "no answer"
        text = self.body.get("error") if isinstance(self.body, dict) else None
        return f"HTTP {self.status}" + (f": {text}" if text else "")


@runtime_checkable
class Transport(Protocol):
    name: str
    priority: int

    def can_send(self, connection: dict, size: int) -> bool:
        """Whether this transport can carry ``size`` bytes to ``connection`` right now."""

    async def send(self, connection: dict, path: str, payload: dict) -> Reply:
        """Deliver ``payload`` to ``path`` (e.g. ``/__darkmatter__/message``) on the peer."""
