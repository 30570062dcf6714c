"""The node's lifecycle: compose state, storage, the HTTP port, MCP, the outbox and plugin lifespans.

``start`` takes the state lock, loads (or creates) the state, binds the port, enters the MCP server's and
every plugin's lifespan in one ``AsyncExitStack``, starts the outbox and discovery, and serves. ``stop``
undoes it in reverse and flushes the state last. The node object itself only holds what these compose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from darkmatter import server
from darkmatter.errors import StartupError
from darkmatter.identity import Identity
from darkmatter.mcp import McpServer
from darkmatter.mesh import outbound
from darkmatter.mesh.outbox import Outbox
from darkmatter.state import StateError, StateLock, apply_overrides, migrate, new_state, open_private
from darkmatter.storage import Persister, Storage

if TYPE_CHECKING:
    from darkmatter.node import Node

log = logging.getLogger(__name__)


def load_state(node: Node, storage: Storage) -> dict:
    raw = storage.load()
    if raw is None:
        state = new_state()
        if node.config.genesis is None:
            state["is_genesis"] = True
        return state
    return migrate(raw)


def read_token(node: Node) -> str:
    """The bearer token of ``/mcp`` for non-loopback clients (§12.3), kept 0600 beside the state file."""
    path = Path(str(node.config.state_file).removesuffix(".json") + ".token")
    try:  # never through a symlink planted at the path (O_NOFOLLOW: ELOOP)
        with os.fdopen(open_private(path, os.O_RDONLY), "r") as f:
            token = f.read(256).strip()
            if len(token) == 64:
                if os.fstat(f.fileno()).st_mode & 0o077:
                    os.fchmod(f.fileno(), 0o600)
                return token
    except FileNotFoundError:
        pass
    token = secrets.token_hex(32)
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    return token


async def start(node: Node, *, serve: bool = True, serve_after: asyncio.Event | None = None) -> None:
    """Start ``node``; with ``serve``, HTTP is answering when this returns -- unless ``serve_after`` is given:
    then the port is bound and listening, and HTTP starts answering once that event is set."""
    if node.stopping is None:
        node.stopping = asyncio.Event()
    if node.http_ready is None:
        node.http_ready = asyncio.Event()
    name = node.config.storage
    if name not in node.storages:
        raise StartupError(f"Unknown storage {name!r} (DARKMATTER_STORAGE). Known: {', '.join(node.storages)}")
    storage = node.storages[name]
    node.lock = StateLock(Path(node.config.state_file))
    node.lock.acquire()
    try:
        try:
            node.state = await asyncio.to_thread(load_state, node, storage)
        except StateError as exc:
            raise StartupError(str(exc)) from None
        node.identity = Identity.from_private_hex(node.state["private_key_hex"])
        if serve:
            node.socket = server.bind_socket(node.config.host, node.config.port)
            node.port = node.socket.getsockname()[1]
        apply_overrides(node.state, port=node.port, display_name=node.config.display_name,
                        bio=node.config.bio, genesis=node.config.genesis)
        try:
            node.token = await asyncio.to_thread(read_token, node)
        except OSError as exc:
            raise StartupError(f"Cannot use the MCP token file beside {node.config.state_file}: {exc.strerror} "
                               "(a symlink there is refused)") from None
        node.persister = Persister(storage, lambda: node.state)
        await node.save()
        node.lock.write_info({"pid": os.getpid(), "port": node.port, "url": node.base_url,
                              "agent_id": node.agent_id})
        node.outbox = Outbox(node, outbound.on_outbox_progress, outbound.on_outbox_finished)
        node.exit_stack = contextlib.AsyncExitStack()
        node.mcp = McpServer(node)
        await node.exit_stack.enter_async_context(node.mcp.lifespan())
        for cm in reversed(node.pm.hook.dm_lifespan(node=node)):
            if cm is not None:
                await node.exit_stack.enter_async_context(cm)
        node.outbox.start()
        if node.config.discovery:
            for source in node.discovery_sources:
                node.spawn(source.run(node.record_discovered), name=f"discovery-{source.name}")
        if serve:
            node.shutdown_event = asyncio.Event()
            node.server_task = asyncio.get_running_loop().create_task(
                server.serve(node, node.shutdown_event, serve_after), name=f"http-{node.port}")
            if serve_after is None:
                await server.wait_ready(node)
        node.started = True
    except BaseException:
        await teardown(node)
        raise


async def stop(node: Node) -> None:
    if node.stopping is not None:
        node.stopping.set()
    await teardown(node)


async def teardown(node: Node) -> None:
    if node.shutdown_event is not None:
        node.shutdown_event.set()
    if node.server_task is not None:
        try:
            await asyncio.wait_for(node.server_task, timeout=5)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            node.server_task.cancel()
        node.server_task = None
    for task in list(node.tasks):
        task.cancel()
    if node.tasks:
        await asyncio.gather(*node.tasks, return_exceptions=True)
    if node.exit_stack is not None:
        try:
            await node.exit_stack.aclose()
        except Exception:  # noqa: BLE001
            log.exception("a plugin lifespan failed at shutdown")
        node.exit_stack = None
    if node.outbox is not None:
        await node.outbox.stop()
    if node.persister is not None:
        try:
            await node.persister.flush()
        except OSError as exc:
            log.error("final state flush failed: %s", exc)
        for storage in node.storages.values():
            storage.close()
    if node.socket is not None:
        node.socket.close()
        node.socket = None
    if node.lock is not None:
        node.lock.release()
        node.lock = None
    node.started = False
