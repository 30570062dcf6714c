"""A2A bridge: any A2A client can reach this node's agent, and the agent can call any A2A agent.

Inbound, the node serves a signed Agent Card at ``/.well-known/agent-card.json`` (and the legacy
``/.well-known/agent.json``) and the A2A JSON-RPC and REST bindings under ``/a2a``, built on the official
``a2a-sdk``; an A2A message becomes an inbox message the agent answers with ``darkmatter_respond_message``.
Outbound, ``darkmatter_a2a_send`` and ``darkmatter_a2a_get_task`` call other A2A agents under the mesh's
outbound request rules. See README.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from darkmatter import hookimpl
from darkmatter.api import ProtocolError, client_ip, error_response

from darkmatter_a2a_bridge import card as cards
from darkmatter_a2a_bridge import outbound
from darkmatter_a2a_bridge import settings as _settings
from darkmatter_a2a_bridge.inbound import TRANSPORT, Bridge

log = logging.getLogger("darkmatter_a2a_bridge")
NAME = "a2a_bridge"


def bridge_for(node: Any) -> Bridge:
    """The node's bridge (one per node: several nodes can share this process)."""
    return node.plugin_state(NAME, lambda: Bridge(node))


def _card_endpoint(bridge: Bridge, legacy: bool):
    async def agent_card(request: Request) -> JSONResponse:
        try:
            bridge.node.rate.check("get_ip", "a2a:" + client_ip(request.scope))
        except ProtocolError as exc:
            return error_response(exc)
        if bridge.card is None:
            return JSONResponse({"error": "The A2A bridge is not running", "code": "unavailable"}, status_code=503)
        bridge.refresh_card()
        return JSONResponse(cards.card_json(bridge.card, legacy=legacy))
    return agent_card


@hookimpl
def dm_register_routes(register, node):
    bridge = bridge_for(node)
    register(Route(cards.CARD_PATH, _card_endpoint(bridge, legacy=False), methods=["GET"]))
    register(Route(cards.LEGACY_CARD_PATH, _card_endpoint(bridge, legacy=True), methods=["GET"]))
    register(Mount(cards.MOUNT, app=bridge.asgi))


@hookimpl
def dm_register_tools(register, node):
    for tool in outbound.TOOLS:
        register(dataclasses.replace(tool))


@contextlib.asynccontextmanager
async def _lifespan(bridge: Bridge, settings: _settings.Settings) -> AsyncIterator[None]:
    await bridge.start(settings)
    log.info("a2a: agent card at %s%s (inbound %s)", bridge.node.base_url, cards.CARD_PATH, settings.inbound)
    try:
        yield
    finally:
        await bridge.stop()


@hookimpl
def dm_lifespan(node):
    # NOTE: settings are read here, synchronously, so a bad value fails node start with a ConfigError.
    return _lifespan(bridge_for(node), _settings.read(node.config))


@hookimpl
def dm_claim_message(node, message):
    if message.get("transport") != TRANSPORT or not message.get("outside_mesh"):
        return None
    bridge = bridge_for(node)
    return bridge.claim if bridge.handler is not None else None


@hookimpl
async def dm_on_message_seen(node, message, state):
    bridge = bridge_for(node)
    if bridge.handler is not None and message.get("transport") == TRANSPORT:
        await bridge.seen(message)
