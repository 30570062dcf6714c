"""Discover DarkMatter nodes on this machine by scanning loopback ports (docs/protocol.md §8.1).

At start-up and every ``DARKMATTER_DISCOVERY_INTERVAL`` seconds (default 30) the node GETs
``http://127.0.0.1:<p>/.well-known/darkmatter.json`` on every port of ``DARKMATTER_DISCOVERY_PORTS``
except its own, concurrently (0.25 s connect, 0.5 s total, 64 KiB at most). Each scan prunes the
kernel's discovered-peer table of entries unseen for ``DARKMATTER_DISCOVERY_PRUNE_SECONDS`` (default 90).
The kernel starts the scan only when ``DARKMATTER_DISCOVERY`` is true.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable

from darkmatter.api import Tool, call, hookimpl, is_self_certifying

__version__ = "0.3.0"

log = logging.getLogger(__name__)

SCAN_TIMEOUT = 0.5
MAX_BYTES = 64 * 1024
WELL_KNOWN = "/.well-known/darkmatter.json"
MAX_ID = 128
MAX_TEXT = 1000
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def entry_from_document(doc: Any, port: int, own_id: str) -> dict | None:
    """The §8.1 entry for a well-known document, or None when it is not a foreign DarkMatter node."""
    if not isinstance(doc, dict) or doc.get("darkmatter") is not True:
        return None
    agent_id = doc.get("agent_id")
    if not isinstance(agent_id, str) or not agent_id.strip() or len(agent_id) > MAX_ID or agent_id == own_id:
        return None
    key = doc.get("public_key_hex")
    key = key.lower() if isinstance(key, str) and _HEX64.match(key) else None
    if is_self_certifying(agent_id) and key not in (None, agent_id):
        log.debug("port %d: agent_id and public_key_hex disagree; ignored", port)
        return None
    return {
        "agent_id": agent_id,
        "url": f"http://127.0.0.1:{port}",
        "display_name": _text(doc.get("display_name"), 200),
        "bio": _text(doc.get("bio")),
        "status": _text(doc.get("status"), 32),
        "genesis": doc.get("is_genesis") is True,
        "accepting": doc.get("accepting_connections") is True,
        "public_key_hex": key,
        "protocol_version": _text(doc.get("protocol_version"), 16),
        "source": "local",
    }


class LocalScan:
    """The ``local`` discovery source: one per node."""

    name = "local"

    def __init__(self, node):
        self.node = node
        config = node.config
        self.interval = config.get_float("DARKMATTER_DISCOVERY_INTERVAL", 30.0, minimum=0.05)
        self.prune_age = config.get_float("DARKMATTER_DISCOVERY_PRUNE_SECONDS", 90.0, minimum=0.05)
        self._found: Callable[[dict], None] | None = None
        self._current: asyncio.Task | None = None
        self.scans = 0

    async def run(self, found: Callable[[dict], None]) -> None:
        self._found = found
        try:
            while True:
                try:
                    await self.scan()
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - one bad scan must not end discovery
                    log.exception("local discovery scan failed")
                await asyncio.sleep(self.interval)
        finally:
            if self._current is not None and not self._current.done():
                self._current.cancel()

    async def scan(self) -> None:
        """Probe every listed port once, now. Concurrent callers share the scan in flight."""
        if self._current is None or self._current.done():
            self._current = asyncio.get_running_loop().create_task(self._scan(), name="discovery-local-scan")
        await asyncio.shield(self._current)

    async def _scan(self) -> None:
        node = self.node
        ports = [p for p in node.config.discovery_ports if p != node.port]
        entries = await asyncio.gather(*(self._probe(p) for p in ports))
        found = self._found or node.record_discovered
        for entry in entries:
            if entry is not None:
                found(entry)
        await node.discovery_settled()  # a new peer's URL is recorded once it proved its key (§6.1)
        node.prune_discovered(self.prune_age)
        self.scans += 1

    async def _probe(self, port: int) -> dict | None:
        reply = await call(self.node, "GET", f"http://127.0.0.1:{port}{WELL_KNOWN}", timeout=SCAN_TIMEOUT,
                           max_bytes=MAX_BYTES)
        if reply.status != 200:
            return None
        return entry_from_document(reply.body, port, self.node.agent_id)


def peer_view(node, entry: dict) -> dict:
    """A discovered entry as the tool shows it: `last_seen` as an ISO time, plus its age in seconds."""
    age = max(0.0, asyncio.get_running_loop().time() - entry["last_seen"])
    seen = datetime.fromtimestamp(time.time() - age, timezone.utc).isoformat()
    view = {k: v for k, v in entry.items() if k != "last_seen"}
    view["last_seen"] = seen
    view["seen_seconds_ago"] = round(age, 1)
    view["connected"] = entry["agent_id"] in node.connections
    return view


async def discover_local(node, args: dict, session) -> dict:
    enabled = bool(node.config.discovery)
    if enabled:
        sources = list(node.discovery_sources)
        results = await asyncio.gather(*(asyncio.wait_for(s.scan(), 5.0) for s in sources),
                                       return_exceptions=True)
        for source, result in zip(sources, results):
            if isinstance(result, BaseException):
                log.warning("discovery source %s could not scan: %s", source.name, result or type(result).__name__)
    peers = sorted((peer_view(node, e) for e in node.discovered.values()),
                   key=lambda p: (p.get("source") != "local", p.get("url") or "", p["agent_id"]))
    return {"discovery_enabled": enabled, "total": len(peers), "peers": peers}


@hookimpl
def dm_register_discovery(register, node):
    register(LocalScan(node))


@hookimpl
def dm_register_tools(register, node):
    register(Tool(
        name="darkmatter_discover_local",
        title="Discover local DarkMatter nodes",
        description=("Scan this machine (and any other discovery source, such as the LAN) for DarkMatter nodes "
                     "now, then list every discovered peer: agent_id, url, display_name, bio, status, "
                     "accepting, source (local/lan), when it was last seen and whether it is already a "
                     "connection. Discovery never connects; use darkmatter_request_connection with a peer's "
                     "url to connect. Returns {discovery_enabled, total, peers}."),
        handler=discover_local,
        read_only=True,
        idempotent=True,
    ))
