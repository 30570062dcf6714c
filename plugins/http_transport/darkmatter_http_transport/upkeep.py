"""Mesh upkeep loops: health checks (§6.4), address-change detection (§6.5), UPnP (§6.6)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time

from darkmatter.api import SMALL, broadcast_peer_update, call, endpoint, host_of, literal_class, recover

log = logging.getLogger(__name__)


async def check_health(node, conn: dict) -> bool:
    path = "/__darkmatter__/status"
    reply = await call(node, "GET", endpoint(conn["agent_url"], "status"), timeout=10.0, max_bytes=SMALL,
                       headers=node.signed_get_headers(path, conn["agent_id"]))
    healthy = reply.status == 200 and isinstance(reply.body, dict) and reply.body.get("agent_id") == conn["agent_id"]
    if conn["agent_id"] not in node.connections:
        return healthy
    before = conn.get("health_failures") or 0
    if healthy:
        conn["health_failures"] = 0
        conn["last_contact"] = time.time()
    else:
        conn["health_failures"] = before + 1
        if conn["health_failures"] == 3:
            log.warning("connection %s unreachable after 3 health checks (%s)", conn["agent_id"][:16],
                        reply.describe())
        if conn["health_failures"] >= 3:
            node.spawn(recover(node, conn["agent_id"]), name="peer-lookup")
    if (before == 0) != healthy or (not healthy and conn["health_failures"] == 3):
        node.save_soon()
        await node.emit("dm_on_connection_changed", agent_id=conn["agent_id"], event="health")
    return healthy


async def health_round(node, stale_after: float) -> None:
    now = time.time()
    due = [c for c in list(node.connections.values())
           if now - (c.get("last_contact") or 0) >= stale_after or (c.get("health_failures") or 0) > 0]
    sem = asyncio.Semaphore(16)

    async def one(conn):
        async with sem:
            await check_health(node, conn)

    await asyncio.gather(*(one(c) for c in due))


async def health_loop(node, interval: float, stale_after: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await health_round(node, stale_after)
        except Exception:  # noqa: BLE001 - the loop must survive one bad round
            log.exception("health round failed")


def lan_address() -> str | None:
    """The primary LAN address (no packet is sent: connecting a UDP socket only picks a route)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only used to select an interface
        return s.getsockname()[0]
    return None


async def public_ip(node, lookup_url: str) -> str | None:
    reply = await call(node, "GET", lookup_url, timeout=5.0, max_bytes=4096)
    if reply.ok and isinstance(reply.body.get("ip"), str):
        ip = reply.body["ip"].strip()
        if literal_class(ip) in ("global", "local"):
            return ip
    return None


async def address_loop(node, interval: float, lookup_url: str) -> None:
    """§6.5: for wildcard or public binds without DARKMATTER_PUBLIC_URL, notice a new address."""
    while True:
        old = node.base_url
        new_host = None
        if lookup_url:
            new_host = await public_ip(node, lookup_url)
        # NOTE: with a lookup service configured, a failed lookup keeps the current URL rather than
        # falling back to the LAN address, which would flap public -> LAN -> public with a peer_update each.
        if new_host is None and node.bind_is_wildcard and not (lookup_url and node.state.get("lan_url")):
            new_host = await asyncio.to_thread(lan_address)
        if new_host:
            host = f"[{new_host}]" if ":" in new_host else new_host
            node.state["lan_url"] = f"http://{host}:{node.state.get('upnp_port') or node.port}"
        if node.base_url != old or (node.state.get("last_public_url") and node.state["last_public_url"] != node.base_url):
            log.info("own URL changed from %s to %s; broadcasting peer_update", old, node.base_url)
            node.spawn(broadcast_peer_update(node), name="peer-update")
        node.state["last_public_url"] = node.base_url
        node.save_soon()
        await asyncio.sleep(interval)


class Upnp:
    """§6.6: one external mapping at a time, deleted before a new one and at shutdown."""

    def __init__(self, port: int):
        self.port = port
        self.external: int | None = None
        self._upnp = None

    def map(self) -> int | None:
        import miniupnpc  # optional dependency, imported only when UPnP is on

        upnp = miniupnpc.UPnP()
        upnp.discoverdelay = 2000
        if upnp.discover() == 0:
            return None
        upnp.selectigd()
        self._upnp = upnp
        self.unmap()
        for _ in range(5):
            external = random.randint(30000, 60000)
            try:
                if upnp.addportmapping(external, "TCP", upnp.lanaddr, self.port, "DarkMatter mesh", ""):
                    self.external = external
                    return external
            except Exception:  # noqa: BLE001 - miniupnpc raises bare Exception on conflicts
                continue
        return None

    def unmap(self) -> None:
        if self._upnp is not None and self.external is not None:
            with contextlib.suppress(Exception):
                self._upnp.deleteportmapping(self.external, "TCP")
            self.external = None


@contextlib.asynccontextmanager
async def lifespan(node):
    config = node.config
    interval = config.get_float("DARKMATTER_HEALTH_INTERVAL", 60.0, minimum=0.05)
    stale = config.get_float("DARKMATTER_HEALTH_STALE_SECONDS", 300.0)
    node.spawn(health_loop(node, interval, stale), name="health")
    public_bind = not node.bind_is_loopback and literal_class(host_of(f"http://{config.host}")) != "local"
    lookup = config.get_str("DARKMATTER_IP_LOOKUP_URL", "https://api.ipify.org?format=json") or ""
    upnp = None
    # NOTE: a mapping lives only as long as one run (deleted at shutdown); a port saved by an earlier run
    # would otherwise be advertised when this run maps nothing (UPnP off or the gateway refusing).
    node.state.pop("upnp_port", None)
    node.state.pop("lan_url", None)  # recomputed by the address loop for this run's port
    if not config.public_url and (node.bind_is_wildcard or public_bind):
        if config.upnp:
            try:
                import miniupnpc  # noqa: F401
            except ImportError:
                log.info("UPnP skipped: miniupnpc is not installed")
            else:
                upnp = Upnp(node.port)
                external = await asyncio.to_thread(upnp.map)
                if external:
                    node.state["upnp_port"] = external
        node.spawn(address_loop(node, config.get_float("DARKMATTER_ADDRESS_INTERVAL", 300.0, minimum=0.05),
                                lookup), name="address")
    elif node.state.get("last_public_url") and node.state["last_public_url"] != node.base_url and node.connections:
        # A restart on a new port or with a new DARKMATTER_PUBLIC_URL (§6.3 sender).
        node.spawn(broadcast_peer_update(node), name="peer-update")
    else:
        node.state["last_public_url"] = node.base_url
    try:
        yield
    finally:
        if upnp is not None:
            await asyncio.to_thread(upnp.unmap)
