"""An MCP client for the network-namespace test, run as ``ip netns exec NS python netns_mcp_client.py BASE [TOKEN_FILE]``.

It waits (bounded) for the node at BASE to answer ``/__darkmatter__/status``, opens one MCP session on
``BASE/mcp`` (with the bearer token from TOKEN_FILE for a non-loopback address), prints ``{"ready": ...}``
and then answers one JSON line ``{"tool": name, "args": {...}}`` on stdin with one JSON line on stdout:
``{"is_error": bool, "result": <structured content>, "text": <text content>}``. It exits at end of input.
Test tooling only: stdout here is the test's control channel.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def out(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


async def wait_for_node(base: str, token_file: Path | None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
        while True:
            try:
                if (await http.get(base + "/__darkmatter__/status")).status_code == 200 and \
                        (token_file is None or token_file.exists()):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"node at {base} did not answer within {timeout} s")
            await anyio.sleep(0.2)


async def main(base: str, token_file: Path | None) -> None:
    await wait_for_node(base, token_file)
    headers = {"Authorization": "Bearer " + token_file.read_text().strip()} if token_file else None
    async with create_mcp_http_client(headers=headers) as http, \
            streamable_http_client(base + "/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        tools = sorted(t.name for t in (await session.list_tools()).tools)
        out({"ready": True, "tools": tools})
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            try:
                with anyio.fail_after(60):
                    result = await session.call_tool(command["tool"], command.get("args") or {})
            except Exception as exc:  # noqa: BLE001 - report to the test instead of dying
                out({"is_error": True, "result": None, "text": f"{type(exc).__name__}: {exc}"})
                continue
            text = "".join(getattr(c, "text", "") for c in result.content)
            out({"is_error": bool(result.is_error), "result": result.structured_content, "text": text})


if __name__ == "__main__":
    anyio.run(main, sys.argv[1].rstrip("/"), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
