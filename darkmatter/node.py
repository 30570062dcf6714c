"""The Node: one agent identity, with its plugins, state and services.

A ``Node`` is cheap to construct (it builds its plugin manager and collects what plugins register);
``await node.start()`` runs the lifecycle of ``darkmatter.lifecycle`` (take the state lock, load the state,
bind the port, enter the plugin lifespans, serve); ``await node.stop()`` undoes it all. ``async with node:``
does both. Several nodes run in one process.

Plugins keep per-node state in objects they register (a transport, a discovery source) or in
``node.plugin_state(name, factory)``; nothing is patched onto the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import pluggy

from darkmatter import PROTOCOL_VERSION, lifecycle
from darkmatter.config import Config
from darkmatter.errors import StartupError
from darkmatter.identity import Identity, v2_string
from darkmatter.mesh.connections import MAX_CONNECTIONS
from darkmatter.mesh.proofs import UrlProofs
from darkmatter.mesh.transport import Transport
from darkmatter.plugins import active_plugins, build_plugin_manager, plugin_name
from darkmatter.ratelimit import RateLimiter, overrides_from_env
from darkmatter.state import GENERIC_BIO
from darkmatter.storage import Persister, Storage
from darkmatter.tools import Tool
from darkmatter.wire import (host_of, is_loopback_host, is_self_certifying, literal_class, normalize, now_iso,
                             urls_match)

log = logging.getLogger(__name__)

DISCOVERED_MAX = 256
SAVE_SOON = 0.05  # seconds a save_soon() change may wait for a write to ride on
DISCOVERED_TTL = 90.0

__all__ = ["Node", "StartupError", "MAX_CONNECTIONS"]


class Node:
    def __init__(self, config: Config, *, pm: pluggy.PluginManager | None = None, plugins: Iterable = ()):
        self.config = config
        self.pm = pm or build_plugin_manager(config.plugins, config.disable, extra=plugins)
        self.state: dict[str, Any] = {}
        self.identity: Identity | None = None
        self.tools: dict[str, Tool] = {}
        self.routes: list = []
        self.transports: list[Transport] = []
        self.discovery_sources: list = []
        self.storages: dict[str, Storage] = {}
        self.discovered: dict[str, dict] = {}
        self.plugin_data: dict[str, Any] = {}  # per-node plugin state, see plugin_state()
        self.rate = RateLimiter(config.rate_limits, overrides_from_env(config.env))
        self.persister: Persister | None = None
        self.port: int = config.port
        self.socket: socket.socket | None = None
        self.token: str | None = None
        self.started = False
        self.stopping = asyncio.Event() if _has_loop() else None
        self.listeners: list[Callable[[], None]] = []
        self.tasks: set[asyncio.Task] = set()
        self.outbox = None  # darkmatter.mesh.outbox.Outbox, created at start
        self.mcp = None  # darkmatter.mcp.McpServer, created at start
        self.inbox_index = None  # darkmatter.mesh.inbound.InboxIndex, rebuilt when the inbox changed
        self.seen_prune_at = 0  # size of the seen-id table at which it is next pruned
        self.recovery_at: dict[str, float] = {}  # agent_id -> monotonic time of its last peer_lookup recovery
        self.url_proofs = UrlProofs()  # §6.1 proofs of discovered peers' URLs
        self.http_ready = asyncio.Event() if _has_loop() else None
        self.lock = None  # darkmatter.state.StateLock, held while started
        self.exit_stack: contextlib.AsyncExitStack | None = None
        self.server_task: asyncio.Task | None = None
        self.shutdown_event: asyncio.Event | None = None
        self._register_all()

    # --- registration ---------------------------------------------------------------------

    def _call_each(self, hook_name: str, make_register: Callable[[str], Callable]) -> None:
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):
            owner = plugin_name(self.pm, impl.plugin)
            kwargs = {"register": make_register(owner), "node": self}
            impl.function(*[kwargs[name] for name in impl.argnames])

    def _register_all(self) -> None:
        tool_owner: dict[str, str] = {}

        def tool_register(owner: str):
            def register(tool: Tool) -> None:
                if tool.name in self.tools:
                    raise StartupError(f"MCP tool {tool.name!r} is registered by both plugin "
                                       f"{tool_owner[tool.name]!r} and plugin {owner!r}")
                tool.plugin = owner
                tool_owner[tool.name] = owner
                self.tools[tool.name] = tool
            return register

        route_owner: dict[tuple[str, str], str] = {}
        self.route_owners = route_owner  # (method, path) -> plugin, for `darkmatter plugins`

        def route_register(owner: str):
            def register(route) -> None:
                methods = sorted(getattr(route, "methods", None) or {"*"})
                for method in methods:
                    key = (method, route.path)
                    if key in route_owner:
                        raise StartupError(f"HTTP route {method} {route.path} is registered by both plugin "
                                           f"{route_owner[key]!r} and plugin {owner!r}")
                    route_owner[key] = owner
                self.routes.append(route)
            return register

        def named(kind: str, target: list | dict):
            owners: dict[str, str] = {}

            def make(owner: str):
                def register(obj) -> None:
                    if obj.name in owners:
                        raise StartupError(f"{kind} {obj.name!r} is registered by both plugin "
                                           f"{owners[obj.name]!r} and plugin {owner!r}")
                    owners[obj.name] = owner
                    if isinstance(target, dict):
                        target[obj.name] = obj
                    else:
                        target.append(obj)
                return register
            return make

        self._call_each("dm_register_tools", tool_register)
        self._call_each("dm_register_routes", route_register)
        self._call_each("dm_register_transports", named("transport", self.transports))
        self._call_each("dm_register_discovery", named("discovery source", self.discovery_sources))
        self._call_each("dm_register_storage", named("storage", self.storages))
        self.transports.sort(key=lambda t: -t.priority)

    # --- identity and URLs ----------------------------------------------------------------

    @property
    def agent_id(self) -> str:
        return self.state["agent_id"]

    @property
    def public_key_hex(self) -> str:
        return self.state["public_key_hex"]

    @property
    def connections(self) -> dict[str, dict]:
        return self.state["connections"]

    @property
    def is_active(self) -> bool:
        return self.state.get("status") == "active"

    @property
    def bind_is_loopback(self) -> bool:
        return is_loopback_host(self.config.host)

    @property
    def bind_is_wildcard(self) -> bool:
        return self.config.host in ("0.0.0.0", "::", "[::]", "")

    @property
    def base_url(self) -> str:
        """§6.5: the node's own base URL."""
        if self.config.public_url:
            return self.config.public_url
        if self.bind_is_loopback:
            host = self.config.host.strip("[]")
            # NOTE: a node bound to another loopback address (e.g. 127.0.0.2) is only reachable there.
            if host not in ("127.0.0.1", "localhost") and ":" not in host:
                return f"http://{host}:{self.port}"
            return f"http://127.0.0.1:{self.port}"
        if not self.bind_is_wildcard:
            host = self.config.host
            return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        lan = self.state.get("lan_url")
        return lan or f"http://127.0.0.1:{self.port}"

    def host_expected(self, host: str) -> bool:
        """§2.1: whether a request to this node, bound to loopback, may carry ``host`` as its Host header: a
        loopback name, or the host of DARKMATTER_PUBLIC_URL (a reverse proxy in front). Anything else is a
        misdirected request (DNS rebinding)."""
        if is_loopback_host(host):
            return True
        public = self.config.public_url
        if public:
            parts = urlsplit(public)
            return host.lower() in (parts.netloc.lower(), (parts.hostname or "").lower())
        return False

    def own_base_urls(self) -> list[str]:
        urls = [self.base_url, f"http://127.0.0.1:{self.port}", f"http://localhost:{self.port}",
                f"http://[::1]:{self.port}"]
        if not self.bind_is_wildcard and not self.bind_is_loopback:
            urls.append(f"http://{self.config.host}:{self.port}")
        return list(dict.fromkeys(urls))

    def is_own_url(self, url: str) -> bool:
        return any(urls_match(url, own) for own in self.own_base_urls())

    def is_local(self) -> bool:
        """§7.3: the node's bind address, or its own URL's host, is loopback or private."""
        if not self.bind_is_wildcard and (literal_class(self.config.host) == "local" or self.bind_is_loopback):
            return True
        # NOTE: a wildcard bind is local only while the URL it advertises is: once the address loop (or the IP
        # lookup) gave it a public URL, it faces the internet and must not reach private targets it does not know.
        return literal_class(host_of(self.base_url)) == "local" or host_of(self.base_url) == "localhost"

    def known_origin(self, url: str) -> bool:
        if self.is_own_url(url):
            return True
        return any(urls_match(url, c.get("agent_url")) for c in self.connections.values())

    def key_of(self, agent_id: str) -> str | None:
        """K(X) of §3.3 (without the pending-request case, which callers handle)."""
        conn = self.connections.get(agent_id)
        if conn and conn.get("agent_public_key_hex"):
            return conn["agent_public_key_hex"]
        if is_self_certifying(agent_id):
            return agent_id
        return None

    def sign(self, text: str) -> str:
        assert self.identity is not None
        return self.identity.sign(text)

    def sign_v2(self, purpose: str, *fields: object) -> str:
        return self.sign(v2_string(purpose, *fields))

    def signed_get_headers(self, path: str, responder_id: str) -> dict[str, str]:
        """§3.8 headers for a GET to a connection."""
        ts = now_iso()
        sig = self.sign_v2("request", "GET", path, self.agent_id, responder_id, ts)
        return {"X-DarkMatter-Agent-Id": self.agent_id, "X-DarkMatter-Timestamp": ts,
                "X-DarkMatter-Signature": sig}

    def accepting_connections(self) -> bool:
        return self.is_active and len(self.connections) < MAX_CONNECTIONS

    def public_status(self) -> dict:
        """§4.8 body."""
        return {"agent_id": self.agent_id, "display_name": self.state.get("display_name"),
                "public_key_hex": self.public_key_hex, "bio": self.state.get("bio"),
                "status": self.state.get("status"), "is_genesis": bool(self.state.get("is_genesis")),
                "num_connections": len(self.connections),
                "accepting_connections": self.accepting_connections(), "protocol_version": PROTOCOL_VERSION}

    def plugin_state(self, key: str, factory: Callable[[], Any]) -> Any:
        """A plugin's per-node state: the object kept under ``key`` (the plugin's name), made by ``factory()``
        on first use. Plugins keep per-node state here, not in module globals or attributes set on the node."""
        if key not in self.plugin_data:
            self.plugin_data[key] = factory()
        return self.plugin_data[key]

    def plugin_list(self) -> list[dict]:
        return [{"name": i.name, "version": i.version} for i in active_plugins(self.pm)]

    # --- persistence ----------------------------------------------------------------------

    async def save(self, ops: list | None = None) -> None:
        """Durable on return (docs/protocol.md §11.2); concurrent callers share one write.

        ``ops`` (journal records, see ``darkmatter/storage.py``) describe the change exactly and make the
        write a small journal append instead of a snapshot; pass them on hot paths only."""
        assert self.persister is not None
        await self.persister.save(ops)

    def save_soon(self, ops: list | None = None) -> None:
        """Persist without waiting, within ``SAVE_SOON`` seconds (riding on any write that happens meanwhile):
        for changes nobody was promised durability of. ``ops`` as for :meth:`save` (mark them in the same
        synchronous step as the change)."""
        if self.persister is not None:
            self.persister.mark(ops, within=SAVE_SOON)

    # --- events and status ----------------------------------------------------------------

    async def emit(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook; await what it returns; isolate failing plugins."""
        caller = getattr(self.pm.hook, hook_name)
        kwargs["node"] = self
        for impl in reversed(caller.get_hookimpls()):
            try:
                result = impl.function(*[kwargs[name] for name in impl.argnames])
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - a plugin must not take the node down
                log.exception("plugin %s failed in %s", plugin_name(self.pm, impl.plugin), hook_name)
        self.changed()

    def changed(self) -> None:
        """Something the live status shows changed: tell listeners (the MCP server)."""
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001
                log.exception("status listener failed")

    def status_lines(self) -> list[str]:
        lines: list[str] = []
        for result in self.pm.hook.dm_status_lines(node=self):
            if result:
                lines.extend(str(line) for line in result)
        return lines

    def spawn(self, coro, name: str | None = None) -> asyncio.Task:
        """Run a background task owned by the node (cancelled at stop)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    # --- discovery table (§8.4) -----------------------------------------------------------

    def record_discovered(self, entry: dict) -> None:
        """Record a discovered peer (§8.4). A self-certifying peer's URL is recorded only once its key signed
        a fresh nonce there (§6.1): a copied well-known document or a replayed beacon proves nothing, so the
        entry waits for that proof (``discovery_settled`` awaits the proofs in flight)."""
        agent_id = entry.get("agent_id")
        if not agent_id or agent_id == self.agent_id:
            return
        if is_self_certifying(agent_id) and not self.url_proofs.proven(agent_id, entry.get("url")):
            self.url_proofs.prove(self, entry)
            return
        self._store_discovered(entry)

    async def discovery_settled(self, timeout: float = 6.0) -> None:
        """Wait (at most ``timeout`` seconds) for the URL proofs of discovered peers still in flight."""
        await self.url_proofs.settled(timeout)

    def _store_discovered(self, entry: dict) -> None:
        agent_id = entry["agent_id"]
        entry = {**entry, "last_seen": entry.get("last_seen") or asyncio.get_running_loop().time()}
        old = self.discovered.get(agent_id)
        if old and old.get("source") == "local" and entry.get("source") == "lan" \
                and entry["last_seen"] - old["last_seen"] < DISCOVERED_TTL:
            return
        for other_id, other in list(self.discovered.items()):
            if other_id != agent_id and other.get("url") == entry.get("url") and entry.get("source") == "local":
                del self.discovered[other_id]
        if agent_id not in self.discovered and len(self.discovered) >= DISCOVERED_MAX:
            oldest = min(self.discovered, key=lambda k: self.discovered[k]["last_seen"])
            del self.discovered[oldest]
        self.discovered[agent_id] = entry

    def prune_discovered(self, max_age: float = DISCOVERED_TTL) -> None:
        now = asyncio.get_running_loop().time()
        for agent_id, entry in list(self.discovered.items()):
            if now - entry["last_seen"] > max_age:
                del self.discovered[agent_id]

    # --- lifecycle (darkmatter.lifecycle) --------------------------------------------------

    async def start(self, *, serve: bool = True, serve_after: asyncio.Event | None = None) -> None:
        """Take the lock, load state, bind (unless ``serve`` is false), enter plugin lifespans, serve (once
        ``serve_after`` is set, when it is given; see ``lifecycle.start``)."""
        await lifecycle.start(self, serve=serve, serve_after=serve_after)

    async def stop(self) -> None:
        await lifecycle.stop(self)

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- small helpers used by plugins and tools ------------------------------------------

    def bio_is_generic(self) -> bool:
        return not self.state.get("bio") or self.state.get("bio") == GENERIC_BIO

    def url_for_connection(self, agent_id: str) -> str | None:
        conn = self.connections.get(agent_id)
        return conn.get("agent_url") if conn else None

    def normalize(self, url: str) -> str:
        return normalize(url)


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
