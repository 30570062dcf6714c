"""A client of the node running on this machine, for the CLI: the node's own MCP endpoint.

The CLI calls the same ``darkmatter_*`` tools an agent calls, at ``http://127.0.0.1:<port>/mcp`` with the official
MCP SDK client: one control plane, and a loopback caller is trusted there (docs/protocol.md §12.3), so no token
is needed. Failures come out as two exceptions the CLI maps to exit codes: :class:`Unreachable` (no node answers)
and :class:`Refused` (the tool answered with an error the person should read).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Awaitable, Callable

FOLLOW_POLL = 5.0  # seconds: `inbox --follow` looks again even when no change notification came


class Unreachable(Exception):
    """No DarkMatter node answers on the port (or what answers is not one)."""


def no_node_answers(port: int, problem: BaseException) -> str:
    """The one-line error of every CLI command that found nothing listening on the node's port."""
    return (f"no DarkMatter node answers on 127.0.0.1:{port} ({type(problem).__name__}); start one with "
            f"`darkmatter run --port {port}`")


class Refused(Exception):
    """The node answered the tool call with an error (``isError``): the text says why."""


def _transport_error(exc: BaseException) -> BaseException | None:
    """The connection-level error inside ``exc`` (also inside exception groups), if any."""
    import httpx2

    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _transport_error(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, (httpx2.TransportError, OSError)):
        return exc
    return None


class LocalNode:
    """``async with LocalNode(port) as node: await node.call("darkmatter_list_inbox", {})``."""

    def __init__(self, port: int, *, timeout: float = 60.0):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/mcp"
        self.timeout = timeout
        self._stack: contextlib.AsyncExitStack | None = None
        self.client: Any = None

    async def __aenter__(self) -> LocalNode:
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        stack = contextlib.AsyncExitStack()
        http = await stack.enter_async_context(httpx2.AsyncClient(
            trust_env=False, timeout=httpx2.Timeout(self.timeout, read=self.timeout + 30)))
        try:
            self.client = await stack.enter_async_context(
                Client(streamable_http_client(self.url, http_client=http), cache=None,
                       read_timeout_seconds=self.timeout + 30))
        except BaseException as exc:
            await stack.aclose()
            raise self._explain(exc) from None
        self._stack = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            with contextlib.suppress(Exception):
                await self._stack.aclose()
            self._stack = None

    def _explain(self, exc: BaseException) -> BaseException:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return exc
        where = f"127.0.0.1:{self.port}"
        problem = _transport_error(exc)
        if problem is not None:
            return Unreachable(no_node_answers(self.port, problem))
        detail = exc
        while isinstance(detail, BaseExceptionGroup) and detail.exceptions:
            detail = detail.exceptions[0]
        return Unreachable(f"the service on {where} does not answer as a DarkMatter node at /mcp "
                           f"({type(detail).__name__}: {str(detail)[:200]})")

    async def call(self, tool: str, arguments: dict | None = None) -> dict:
        """Call one tool; its JSON result, or :class:`Refused` with the tool's error text."""
        try:
            result = await self.client.call_tool(tool, arguments or {})
        except Exception as exc:  # noqa: BLE001 - connection trouble mid-call
            raise self._explain(exc) from None
        text = "".join(getattr(part, "text", "") for part in result.content or [])
        if result.is_error:
            raise Refused(text or f"{tool} failed")
        data = result.structured_content
        if isinstance(data, dict):
            return data
        try:
            data = json.loads(text)
        except ValueError:
            return {"result": text}
        return data if isinstance(data, dict) else {"result": data}

    async def watch(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Await ``refresh()`` whenever the node may have changed: on each ``tools/list_changed`` event of a
        ``subscriptions/listen`` stream, and every ``FOLLOW_POLL`` seconds regardless. Runs until cancelled."""
        import anyio

        while True:
            try:
                async with self.client.listen(tools_list_changed=True) as subscription:
                    events = subscription.__aiter__()
                    ended = False
                    while not ended:
                        with anyio.move_on_after(FOLLOW_POLL):
                            try:
                                await events.__anext__()
                            except StopAsyncIteration:
                                ended = True
                        await refresh()
            except (Unreachable, Refused):
                raise
            except Exception as exc:  # noqa: BLE001 - no listen support, or the stream dropped: poll instead
                if _transport_error(exc) is not None:
                    raise self._explain(exc) from None
                await anyio.sleep(FOLLOW_POLL / 5)
                await refresh()
