"""The discovery-source protocol (docs/protocol.md §8); the kernel owns the discovered-peer table."""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable


@runtime_checkable
class DiscoverySource(Protocol):
    name: str

    async def run(self, found: Callable[[dict], None]) -> None:
        """Run until cancelled, calling ``found(entry)`` for every peer seen.

        ``entry`` holds the §8.1 fields: agent_id, url, display_name, bio, status, genesis, accepting,
        public_key_hex, protocol_version, source (``local``/``lan``/...), and optionally verified."""

    async def scan(self) -> None:
        """Probe once, now; found peers reach the same ``found`` callback as ``run``'s."""
