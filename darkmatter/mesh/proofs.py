"""Proofs of possession for discovered peers' URLs (docs/protocol.md §6.1, §8).

A discovery source learns ``(agent_id, url)`` pairs from documents and beacons that anyone can copy or
replay. For a self-certifying id the node records the pair only after the node at ``url`` signed a fresh
nonce with that id's key (``healing.check_url``); proofs are remembered for a while, and a failed proof is
not retried for a short while, so a scan every 30 s costs one challenge per new pair.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from darkmatter.node import Node

log = logging.getLogger(__name__)

PROVEN_TTL = 600.0   # a proven (agent_id, url) pair is trusted this long before it is proven again
FAILED_TTL = 30.0    # a pair that failed is not challenged again for this long
MAX_PAIRS = 1024
MAX_IN_FLIGHT = 64


class UrlProofs:
    def __init__(self) -> None:
        self._proven: dict[tuple[str, str], float] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}

    def proven(self, agent_id: str, url: Any) -> bool:
        at = self._proven.get((agent_id, str(url)))
        return at is not None and time.monotonic() - at < PROVEN_TTL

    def prove(self, node: Node, entry: dict) -> None:
        """Start proving ``entry``'s URL in the background; record the entry when the proof succeeds."""
        key = (entry["agent_id"], str(entry.get("url")))
        if key in self._tasks or len(self._tasks) >= MAX_IN_FLIGHT:
            return
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() - failed < FAILED_TTL:
            return
        task = node.spawn(self._prove(node, key, dict(entry)), name="discovery-proof")
        self._tasks[key] = task
        task.add_done_callback(lambda _t: self._tasks.pop(key, None))

    async def _prove(self, node: Node, key: tuple[str, str], entry: dict) -> None:
        from darkmatter.mesh.healing import check_url

        outcome = await check_url(node, key[0], key[1]) if isinstance(entry.get("url"), str) else "mismatch"
        now = time.monotonic()
        table = self._proven if outcome == "ok" else self._failed
        table[key] = now
        if len(table) > MAX_PAIRS:
            for old in sorted(table, key=table.get)[: len(table) - MAX_PAIRS]:
                del table[old]
        if outcome == "ok":
            self._failed.pop(key, None)
            node._store_discovered(entry)
        else:
            log.info("discovered %s at %s not recorded: the URL did not prove the key (%s)", key[0][:12], key[1],
                     outcome)

    async def settled(self, timeout: float) -> None:
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
