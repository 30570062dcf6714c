"""Start an agent for each incoming DarkMatter message.

Off unless ``DARKMATTER_AGENT_ENABLED=true``. For each message accepted into the inbox (over any transport)
from a connected peer with a verified signature, the node starts ``DARKMATTER_AGENT_COMMAND -p <prompt>``
(default ``claude``) as a subprocess, within a concurrency cap and a rolling-hour cap, with a timeout
watchdog. The agent attaches to this node as a parallel MCP session and answers or forwards the message.
See README.md for every setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from darkmatter.api import hookimpl

from darkmatter_autospawn import settings as _settings
from darkmatter_autospawn.spawner import Spawner

log = logging.getLogger("darkmatter_autospawn")

NAME = "autospawn"


class _Slot:
    """The node's running spawner (several nodes can share this process and this module)."""

    spawner: Spawner | None = None


def _slot(node: Any) -> _Slot:
    return node.plugin_state(NAME, _Slot)


def spawner_for(node: Any) -> Spawner | None:
    """The node's running spawner, or None when autospawn is off for it."""
    return _slot(node).spawner


@contextlib.asynccontextmanager
async def _lifespan(node: Any, config: _settings.Settings) -> AsyncIterator[None]:
    await asyncio.to_thread(_settings.check_paths, config)
    spawner = Spawner(node, config)
    _slot(node).spawner = spawner
    log.info("autospawn: on (command %s, at most %d at once and %d per %gs, timeout %gs)",
             config.command[0], config.max_concurrent, config.max_per_hour, config.window, config.timeout)
    try:
        yield
    finally:
        try:
            await spawner.aclose()
        finally:
            _slot(node).spawner = None


@hookimpl
def dm_lifespan(node):
    # NOTE: settings are read here, synchronously, so a bad value fails node start with a ConfigError.
    config = _settings.read(node.config)
    if not config.enabled:
        return None
    if config.inside_spawned_agent:
        log.warning("autospawn: DARKMATTER_AGENT_ENABLED is true inside an agent this plugin spawned "
                    "(%s is set); not spawning (recursion guard)", _settings.SPAWNED_MARKER)
        return None
    return _lifespan(node, config)


@hookimpl
def dm_on_message_received(node, message):
    spawner = spawner_for(node)
    if spawner is not None:
        spawner.offer(message)  # queues and starts tasks; never waits for an agent


@hookimpl
def dm_status_lines(node):
    spawner = spawner_for(node)
    return spawner.status_lines() if spawner is not None else None
