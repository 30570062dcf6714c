"""The memory transport: nodes of one process exchanging mesh requests through in-memory calls.

A :class:`MemoryNetwork` is a switchboard; each node that joins it registers a :class:`MemoryTransport`
(URLs ``memory://<name>``) through :meth:`MemoryNetwork.plugin`. A request is encoded to JSON and decoded
again on the way in and on the way out, exactly as a wire would, and handed to the target node's inbound
entry (``darkmatter.api.handle``) with a :class:`~darkmatter.api.Caller` of ``ip="memory:<sender>"``.

Faults are injected on the switchboard: :meth:`drop` (the next requests matching a rule fail as a refused
connection), :meth:`delay`, :meth:`partition` (two groups cannot reach each other), :meth:`kill` and
:meth:`revive` (a node stops answering, as a crashed host would). It proves the kernel is transport-neutral
and makes simulations of a thousand nodes cheap.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any
from urllib.parse import unquote, urlsplit

from darkmatter.api import (LARGE, MAX_BODY, Blocked, Caller, ProtocolError, Reply, cj, handle, hookimpl,
                            loads_object, route_of)

SCHEME = "memory://"


@dataclasses.dataclass
class Rule:
    """A fault rule: requests from ``source`` to ``target`` (None matches any), optionally only for one
    operation; ``count`` requests at most (None: until removed)."""

    source: str | None = None
    target: str | None = None
    op: str | None = None
    count: int | None = None
    seconds: float = 0.0

    def matches(self, source: str, target: str, op: str | None) -> bool:
        return ((self.source is None or self.source == source) and (self.target is None or self.target == target)
                and (self.op is None or self.op == op) and (self.count is None or self.count > 0))

    def use(self) -> None:
        if self.count is not None:
            self.count -= 1


class MemoryNetwork:
    """Nodes by name, plus the faults between them."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {}
        self.drops: list[Rule] = []
        self.delays: list[Rule] = []
        self.groups: list[tuple[frozenset, frozenset]] = []
        self.dead: set[str] = set()
        self.requests = 0  # requests carried (for simulations)

    # --- joining --------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        return SCHEME + name

    def plugin(self, name: str) -> object:
        """A plugin object that registers this network's transport on a node called ``name``."""
        network = self

        class MemoryTransportPlugin:
            @hookimpl
            def dm_register_transports(self, register, node):
                register(MemoryTransport(network, name, node))

        return MemoryTransportPlugin()

    # --- faults ---------------------------------------------------------------------------------

    def drop(self, source: str | None = None, target: str | None = None, *, op: str | None = None,
             count: int | None = None) -> Rule:
        rule = Rule(source, target, op, count)
        self.drops.append(rule)
        return rule

    def delay(self, seconds: float, source: str | None = None, target: str | None = None, *,
              op: str | None = None) -> Rule:
        rule = Rule(source, target, op, None, seconds)
        self.delays.append(rule)
        return rule

    def partition(self, group_a, group_b) -> None:
        self.groups.append((frozenset(group_a), frozenset(group_b)))

    def heal(self) -> None:
        """Remove every drop, delay and partition (killed nodes stay dead)."""
        self.drops.clear()
        self.delays.clear()
        self.groups.clear()

    def kill(self, name: str) -> None:
        self.dead.add(name)

    def revive(self, name: str) -> None:
        self.dead.discard(name)

    def fault(self, source: str, target: str, op: str | None) -> str | None:
        if target in self.dead or source in self.dead:
            return f"{target} is down"
        for a, b in self.groups:
            if (source in a and target in b) or (source in b and target in a):
                return f"{source} and {target} are partitioned"
        for rule in self.drops:
            if rule.matches(source, target, op):
                rule.use()
                return "dropped"
        return None

    def delay_for(self, source: str, target: str, op: str | None) -> float:
        return sum(r.seconds for r in self.delays if r.matches(source, target, op))


def _connect_error(text: str) -> Reply:
    return Reply(None, error=f"connect error: {text}", error_kind="connect", transport="memory")


class MemoryTransport:
    """One node's port on a :class:`MemoryNetwork`."""

    name = "memory"
    priority = 0

    def __init__(self, network: MemoryNetwork, own_name: str, node: Any):
        self.network = network
        self.own_name = own_name
        if node is not None:  # a probe (node None) sends but cannot be reached
            network.nodes[own_name] = node

    def handles(self, url: str) -> bool:
        return url.startswith(SCHEME)

    async def check(self, url: str, strict: bool) -> None:
        host = urlsplit(url).hostname or ""
        if host not in self.network.nodes:
            raise Blocked(f"no memory node is called {host!r}")

    async def request(self, method: str, url: str, *, json_body: Any = None, headers: dict | None = None,
                      timeout: float = 15.0, max_bytes: int = LARGE, strict: bool = False, **_: Any) -> Reply:
        network = self.network
        network.requests += 1
        parts = urlsplit(url)
        target_name = parts.hostname or ""
        route = route_of(method, unquote(parts.path))
        op = route[0] if route else None
        problem = network.fault(self.own_name, target_name, op)
        target = network.nodes.get(target_name)
        if problem is None and (target is None or not target.started):
            problem = f"no memory node {target_name!r} is running"
        if problem is not None:
            return _connect_error(problem)
        wait = network.delay_for(self.own_name, target_name, op)
        try:
            async with asyncio.timeout(timeout):
                if wait:
                    await asyncio.sleep(wait)
                if route is None:
                    return Reply(404, {"error": "Not found", "code": "not_found"}, transport="memory")
                body = None
                if method == "POST":
                    raw = cj(json_body).encode("utf-8")
                    if len(raw) > MAX_BODY:
                        return Reply(413, {"error": f"Request body exceeds {MAX_BODY} bytes", "code": "too_large"},
                                     transport="memory")
                    body = loads_object(raw)
                caller = Caller(ip="memory:" + self.own_name, host=target_name, scheme="memory",
                                headers={k.lower(): v for k, v in (headers or {}).items()}, transport="memory")
                try:
                    answer = await handle(target, route[0], caller, body, route[1])
                except ProtocolError as exc:
                    retry = exc.extra.get("retry_after")
                    return Reply(exc.status, exc.body(), transport="memory",
                                 retry_after=float(retry) if retry is not None else None)
        except TimeoutError:
            return Reply(None, error="timed out", error_kind="timeout", transport="memory")
        encoded = cj(answer).encode("utf-8")
        if len(encoded) > max_bytes:
            return Reply(None, error=f"answer larger than {max_bytes} bytes", error_kind="invalid",
                         transport="memory")
        return Reply(200, loads_object(encoded), transport="memory")

    def can_send(self, connection: dict, size: int) -> bool:
        url = connection.get("agent_url")
        return isinstance(url, str) and self.handles(url)

    async def send(self, connection: dict, path: str, payload: dict) -> Reply:
        return await self.request("POST", connection["agent_url"] + path, json_body=payload)
