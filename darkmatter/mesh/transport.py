"""The transport interface: every mesh interaction, outbound and inbound, crosses a transport.

Outbound, the kernel asks a transport to carry a request to a URL (``request``) or an envelope to a
connection (``send``); inbound, a transport turns what it received into one call of the kernel's entry
``darkmatter.mesh.inbound.handle(node, op, caller, body, arg)`` and carries the answer back. The kernel
never speaks HTTP (or anything else) itself. ``docs/plugin-hooks.md`` has a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

from darkmatter.wire import is_loopback_host

PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
SMALL = 64 * 1024  # the read cap of control answers (webhooks, lookups, documents)
LARGE = 1024 * 1024  # the read cap of everything else (docs/protocol.md §13.3)


class TransportUnavailable(Exception):
    """This transport cannot carry the envelope now; the kernel tries the next one."""


class Blocked(Exception):
    """The URL must not be used (docs/protocol.md §7.3): the message says why."""


@dataclass
class Caller:
    """Where an inbound request came from, as the transport that carried it saw it.

    ``ip`` is the peer's address (``memory:<name>`` on the memory transport), ``host`` the Host header (or
    the name the peer addressed), ``scheme`` the URL scheme, ``headers`` the lowercased request headers,
    ``transport`` the transport's name."""

    ip: str = ""
    host: str = ""
    scheme: str = "http"
    headers: Mapping[str, str] = field(default_factory=dict)
    transport: str = "http"
    forwarded_for: str | None = None  # the client a trusted proxy named (DARKMATTER_TRUSTED_PROXIES), if any

    @property
    def proxied(self) -> bool:
        """§2.1: the request carries ``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP``: it came through a proxy."""
        return any(name in self.headers for name in PROXY_HEADERS)

    @property
    def is_loopback(self) -> bool:
        """A loopback TCP peer that did not come through a proxy (§2.1, §12.3): a same-host reverse proxy's
        requests are the internet's, not this machine's."""
        return bool(self.ip) and is_loopback_host(self.ip) and not self.proxied


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
    """A mesh transport, registered through ``dm_register_transports``.

    ``name`` is unique; ``priority`` orders the transports (higher first). A transport that reaches peers
    by URL (HTTP, the memory transport) says so in ``handles(url)`` and carries requests in ``request``;
    a transport that only rides on an existing connection (a WebRTC data channel) answers ``False`` there
    and carries envelopes in ``send``. No method raises for a network or peer fault: the fault comes back
    in the :class:`Reply`.
    """

    name: str
    priority: int

    def handles(self, url: str) -> bool:
        """Whether this transport can reach ``url`` (usually: its scheme). Synchronous."""

    async def check(self, url: str, strict: bool) -> None:
        """Raise :class:`Blocked` when ``url`` must not be used (docs/protocol.md §7.3); ``strict`` for
        URLs the node learned from a peer (webhooks), where private targets need a local node."""

    async def request(self, method: str, url: str, *, json_body: Any = None, headers: dict | None = None,
                      timeout: float = 15.0, max_bytes: int = LARGE, strict: bool = False) -> Reply:
        """Carry one request (``GET`` or ``POST`` with a JSON object) to ``url`` and return the answer."""

    def can_send(self, connection: dict, size: int) -> bool:
        """Whether this transport can carry an envelope of ``size`` bytes to ``connection`` now."""

    async def send(self, connection: dict, path: str, payload: dict) -> Reply:
        """Deliver ``payload`` to ``path`` (e.g. ``/__darkmatter__/message``) on the connection; raise
        :class:`TransportUnavailable` to let the kernel fall back to the next transport."""
