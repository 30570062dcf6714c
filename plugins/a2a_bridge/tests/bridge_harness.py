"""The A2A bridge tests' harness: real nodes on loopback (kernel, http_transport and this plugin only), the
official a2a-sdk client, the official MCP client, and a2a-sdk servers on hypercorn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from pathlib import Path
from typing import AsyncIterator

import httpx
import httpx2
from a2a.client import ClientConfig, create_client
from a2a.helpers import get_message_text
from a2a.server.agent_execution import AgentExecutor
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import (AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Artifact, Message, Part, Role,
                       SendMessageConfiguration, SendMessageRequest, Task, TaskArtifactUpdateEvent, TaskState,
                       TaskStatus, TaskStatusUpdateEvent)
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from mcp import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.routing import Route

from darkmatter.testing import node_context

PLUGINS = "http_transport,a2a_bridge"
BINDINGS = {"jsonrpc": "JSONRPC", "rest": "HTTP+JSON"}


def bridge_node(directory: Path, **env: str):
    """A started node with only the kernel, http_transport and the bridge."""
    return node_context(directory, plugins=PLUGINS, **env)


@contextlib.asynccontextmanager
async def a2a_client(node_or_url, binding: str = "jsonrpc", *, streaming: bool = False,
                     headers: dict | None = None) -> AsyncIterator:
    """The official client for a node (or a URL), on one binding, from its agent card."""
    url = node_or_url if isinstance(node_or_url, str) else node_or_url.base_url
    async with httpx.AsyncClient(trust_env=False, headers=headers or {}, timeout=30.0) as http:
        config = ClientConfig(httpx_client=http, streaming=streaming, supported_protocol_bindings=[BINDINGS[binding]])
        client = await create_client(url, config)
        yield client


def user_message(text: str, **fields) -> Message:
    return Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=text)], **fields)


def send_request(text: str, *, immediately: bool = True, **fields) -> SendMessageRequest:
    return SendMessageRequest(message=user_message(text, **fields),
                              configuration=SendMessageConfiguration(return_immediately=immediately))


def mcp_client(node) -> McpClient:
    http = httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30.0, read=120.0))
    return McpClient(streamable_http_client(f"http://127.0.0.1:{node.port}/mcp", http_client=http))


async def call(session: McpClient, tool: str, **arguments) -> dict:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def wait_for(predicate, timeout: float = 10.0, step: float = 0.02):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError("condition not met in time")


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve_app(app, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """Serve an ASGI app with hypercorn on a free loopback port; yields its base URL."""
    sock = sock or free_socket()
    config = HypercornConfig()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.graceful_timeout = 1
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(serve(app, config, shutdown_trigger=stop.wait))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(trust_env=False) as probe:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    await probe.get(url + "/")
                    break
                await asyncio.sleep(0.02)
        yield url
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class EchoExecutor(AgentExecutor):
    """Answers ``echo: <text>`` after ``delay`` seconds, as a completed task with an artifact."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    async def execute(self, context, event_queue) -> None:
        task = Task(id=context.task_id, context_id=context.context_id, history=[context.message],
                    status=TaskStatus(state=TaskState.TASK_STATE_WORKING))
        await event_queue.enqueue_event(task)
        await asyncio.sleep(self.delay)
        text = "echo: " + get_message_text(context.message)
        await event_queue.enqueue_event(TaskArtifactUpdateEvent(
            task_id=context.task_id, context_id=context.context_id,
            artifact=Artifact(artifact_id="a1", name="echo", parts=[Part(text=text)])))
        await event_queue.enqueue_event(TaskStatusUpdateEvent(
            task_id=context.task_id, context_id=context.context_id,
            status=TaskStatus(state=TaskState.TASK_STATE_COMPLETED)))

    async def cancel(self, context, event_queue) -> None:
        await event_queue.enqueue_event(TaskStatusUpdateEvent(
            task_id=context.task_id, context_id=context.context_id,
            status=TaskStatus(state=TaskState.TASK_STATE_CANCELED)))


def echo_card(base: str, *, name: str = "Echo") -> AgentCard:
    return AgentCard(
        name=name, description="Repeats what it is told.", version="1.0",
        supported_interfaces=[AgentInterface(url=base + "/rpc", protocol_binding="JSONRPC", protocol_version="1.0"),
                              AgentInterface(url=base + "/rest", protocol_binding="HTTP+JSON", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=True), default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="echo", name="Echo", description="Echoes", tags=["echo"])])


@contextlib.asynccontextmanager
async def echo_agent(*, delay: float = 0.0, sign=None) -> AsyncIterator[str]:
    """An a2a-sdk server (the SDK's handler, routes and in-memory store) that echoes; ``sign`` may change the
    card (e.g. sign it) before it is served. Yields its base URL."""
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    card = echo_card(base)
    if sign is not None:
        card = sign(card)
    handler = DefaultRequestHandler(agent_executor=EchoExecutor(delay), task_store=InMemoryTaskStore(),
                                    agent_card=card)
    routes = (create_agent_card_routes(card) + create_jsonrpc_routes(handler, "/rpc")
              + [r for r in create_rest_routes(handler, path_prefix="/rest") if isinstance(r, Route)])
    app = Starlette(routes=routes)
    try:
        async with serve_app(app, sock) as url:
            yield url
    finally:
        await handler.aclose()
