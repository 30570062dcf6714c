"""The bridge's MCP tools as the node registers them at start: their names and schemas here, their work in
:mod:`darkmatter_a2a_bridge.outbound`, loaded (with the A2A SDK, off the event loop) at the first call."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from darkmatter.api import Tool, integer, string

OUTBOUND = "darkmatter_a2a_bridge.outbound"


def _deferred(name: str):
    async def handler(node: Any, args: dict, session: Any) -> dict:
        module = await asyncio.to_thread(importlib.import_module, OUTBOUND)
        return await getattr(module, name)(node, args, session)
    handler.__name__ = name
    return handler


def tools() -> list[Tool]:
    """The bridge's tools, made fresh for each node."""
    return [
        Tool("darkmatter_a2a_send", "Send a message to an A2A agent (any framework that speaks A2A) and wait for "
             "its answer. Give the agent's URL (its base URL or its agent card's URL); its card is fetched and "
             "checked (a signed card must verify). Returns the answer, or the task_id to follow with "
             "darkmatter_a2a_get_task when it is not done within wait_seconds.", _deferred("send"),
             {"url": string("The A2A agent's URL, e.g. https://agent.example.com", max_length=2048, min_length=1),
              "text": string("The message text.", min_length=1, max_length=65536),
              "wait_seconds": integer("How long to wait for the answer.", minimum=0, maximum=300, default=30)},
             ("url", "text"), open_world=True, title="Call an A2A agent"),
        Tool("darkmatter_a2a_get_task", "The state and answer of a task darkmatter_a2a_send started with an A2A "
             "agent; optionally wait for it to finish.", _deferred("get_task"),
             {"task_id": string("The task_id darkmatter_a2a_send returned.", min_length=1, max_length=256),
              "wait_seconds": integer("How long to wait for it to finish.", minimum=0, maximum=300, default=0)},
             ("task_id",), read_only=True, open_world=True, title="Follow an A2A task"),
    ]
