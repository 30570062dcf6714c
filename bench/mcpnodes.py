"""Subprocess nodes driven through their MCP tools (the official SDK's streamable HTTP client on /mcp)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from bench.common import PYTHON, Child, child_env, free_port, wait_http


class ToolFailed(RuntimeError):
    pass


class McpNode:
    """``darkmatter run`` (http mode, plugin http_transport) in its own process, with an open MCP session."""

    def __init__(self, home: Path, log: Path, **env: str):
        self.home = home
        self.port = free_port()
        self.state_file = home / "state.json"
        self.env = child_env(home, DARKMATTER_TRANSPORT="http", DARKMATTER_PORT=str(self.port),
                             DARKMATTER_STATE_FILE=str(self.state_file), DARKMATTER_PLUGINS="http_transport", **env)
        self.log = log
        self.child: Child | None = None
        self.client = None
        self.calls = 0
        self.agent_id = ""
        self.url = f"http://127.0.0.1:{self.port}"
        self._stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> McpNode:
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        self.home.mkdir(parents=True, exist_ok=True)
        self.calls = 0
        self.child = Child([PYTHON, "-m", "darkmatter", "run"], self.env, log=self.log)
        await wait_http(self.port, child=self.child, timeout=60)
        self._stack = contextlib.AsyncExitStack()
        http = httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(30.0, read=120.0))
        self.client = await self._stack.enter_async_context(
            Client(streamable_http_client(f"{self.url}/mcp", http_client=http), mode="legacy"))
        ident = await self.call("darkmatter_get_identity")
        self.agent_id = ident["agent_id"]
        return self

    async def call(self, name: str, **args: Any) -> dict:
        self.calls += 1
        result = await self.client.call_tool(name, args)
        if result.is_error:
            raise ToolFailed(f"{name}: {result.content[0].text if result.content else '?'}")
        return result.structured_content or {}

    async def try_call(self, name: str, **args: Any) -> dict | None:
        try:
            return await self.call(name, **args)
        except ToolFailed:
            return None

    async def stop(self) -> None:
        if self._stack is not None:
            with contextlib.suppress(Exception):
                await self._stack.aclose()
            self._stack = None
        if self.child is not None:
            self.child.stop()
            self.child = None

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
