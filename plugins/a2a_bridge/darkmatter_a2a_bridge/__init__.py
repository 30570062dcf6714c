"""A2A bridge: any A2A client can reach this node's agent, and the agent can call any A2A agent.

Inbound, the node serves a signed Agent Card at ``/.well-known/agent-card.json`` (and the legacy
``/.well-known/agent.json``) and the A2A JSON-RPC and REST bindings under ``/a2a``, built on the official
``a2a-sdk``; an A2A message becomes an inbox message the agent answers with ``darkmatter_respond_message``.
Outbound, ``darkmatter_a2a_send`` and ``darkmatter_a2a_get_task`` call other A2A agents under the mesh's
outbound request rules. See README.md.

The SDK (protobuf types, its server and client) is loaded at first use, off the event loop: the first request
for the card or under ``/a2a``, the first A2A tool call, or the first time an A2A message in the inbox is
answered, declined or shown to the agent. A node that is never reached over A2A starts and idles without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from darkmatter import hookimpl
from darkmatter.api import ProtocolError, client_ip, error_response

from darkmatter_a2a_bridge import settings as _settings
from darkmatter_a2a_bridge.paths import CARD_PATH, LEGACY_CARD_PATH, MOUNT, TRANSPORT
from darkmatter_a2a_bridge.tooldefs import tools

log = logging.getLogger("darkmatter_a2a_bridge")
NAME = "a2a_bridge"
INBOUND = "darkmatter_a2a_bridge.inbound"


def bridge_for(node: Any):
    """The node's bridge (one per node: several nodes can share this process). Loads the SDK side if it was
    not loaded yet (synchronously: for tests and tools; the node itself loads it off the loop)."""
    module = importlib.import_module(INBOUND)
    return node.plugin_state(NAME, lambda: module.Bridge(node))


class Lazy:
    """What the plugin knows of one node before the SDK side is needed: the settings of the current run, and
    whether the node is running. :meth:`bridge` loads and starts the SDK side on first use."""

    def __init__(self, node: Any):
        self.node = node
        self.settings: _settings.Settings | None = None  # set while the node runs (its lifespan)
        self.started = None  # the Bridge started for this run, once something needed it
        self._lock = asyncio.Lock()

    async def bridge(self):
        """The started bridge of this run, or None when the node is not running."""
        if self.started is not None or self.settings is None:
            return self.started
        async with self._lock:
            if self.started is None and self.settings is not None:
                await asyncio.to_thread(importlib.import_module, INBOUND)  # the SDK: off the event loop
                bridge = bridge_for(self.node)
                await bridge.start(self.settings)
                self.started = bridge
                log.info("a2a: agent card at %s%s (inbound %s)", self.node.base_url, CARD_PATH,
                         self.settings.inbound)
        return self.started


def lazy_for(node: Any) -> Lazy:
    return node.plugin_state(NAME + ".lazy", lambda: Lazy(node))


def _card_endpoint(lazy: Lazy, legacy: bool):
    async def agent_card(request: Request) -> JSONResponse:
        try:
            lazy.node.rate.check("get_ip", "a2a:" + client_ip(request.scope))
        except ProtocolError as exc:
            return error_response(exc)
        bridge = await lazy.bridge()
        if bridge is None or bridge.card is None:
            return JSONResponse({"error": "The A2A bridge is not running", "code": "unavailable"}, status_code=503)
        bridge.refresh_card()
        from darkmatter_a2a_bridge import card as cards

        return JSONResponse(cards.card_json(bridge.card, legacy=legacy))
    return agent_card


def _a2a_app(lazy: Lazy):
    async def app(scope, receive, send) -> None:
        bridge = await lazy.bridge() if scope["type"] == "http" else None
        if bridge is None:
            await JSONResponse({"error": "The A2A bridge is not running", "code": "unavailable"},
                               status_code=503)(scope, receive, send)
            return
        await bridge.asgi(scope, receive, send)
    return app


class _LazyClaim:
    """The ``dm_claim_message`` answer for the bridge's inbox messages, loading the SDK side when used."""

    def __init__(self, lazy: Lazy):
        self.lazy = lazy

    async def respond(self, message: dict, response: str, metadata: dict) -> dict:
        bridge = await self.lazy.bridge()
        if bridge is None:
            return {"delivery": "failed", "last_error": "the A2A bridge is not running"}
        return await bridge.claim.respond(message, response, metadata)

    async def expire(self, message: dict) -> None:
        bridge = await self.lazy.bridge()
        if bridge is not None:
            await bridge.claim.expire(message)


@hookimpl
def dm_register_routes(register, node):
    lazy = lazy_for(node)
    register(Route(CARD_PATH, _card_endpoint(lazy, legacy=False), methods=["GET"]))
    register(Route(LEGACY_CARD_PATH, _card_endpoint(lazy, legacy=True), methods=["GET"]))
    register(Mount(MOUNT, app=_a2a_app(lazy)))


@hookimpl
def dm_register_tools(register, node):
    for tool in tools():
        register(tool)


@contextlib.asynccontextmanager
async def _lifespan(lazy: Lazy, settings: _settings.Settings) -> AsyncIterator[None]:
    lazy.settings = settings
    try:
        yield
    finally:
        lazy.settings = None
        bridge, lazy.started = lazy.started, None
        if bridge is not None:
            await bridge.stop()


@hookimpl
def dm_lifespan(node):
    # NOTE: settings are read here, synchronously, so a bad value fails node start with a ConfigError.
    return _lifespan(lazy_for(node), _settings.read(node.config))


@hookimpl
def dm_claim_message(node, message):
    if message.get("transport") != TRANSPORT or not message.get("outside_mesh"):
        return None
    lazy = lazy_for(node)
    return _LazyClaim(lazy) if lazy.settings is not None else None


@hookimpl
async def dm_on_message_seen(node, message, state):
    if message.get("transport") != TRANSPORT:
        return
    bridge = await lazy_for(node).bridge()
    if bridge is not None and bridge.handler is not None:
        await bridge.seen(message)
