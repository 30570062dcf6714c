"""The HTTP transport: the mesh's requests and envelopes over HTTP(S), with the node's pooled client."""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, Any

from darkmatter.api import LARGE, Reply

if TYPE_CHECKING:
    from darkmatter_http_transport.client import Net

SCHEMES = ("http://", "https://")
CLIENT = "darkmatter_http_transport.client"


class HttpTransport:
    name = "http"
    priority = 0

    def __init__(self, node):
        self.node = node
        self.net: Net | None = None  # made at the first outbound request, closed at shutdown

    def open(self) -> Net:
        """The pooled client (made now if it was not yet)."""
        if self.net is None:
            # NOTE: import_module, not sys.modules: while another thread imports the client (the first
            # request of this or another node in the process), sys.modules holds it half initialized, and
            # import_module waits for that import to finish.
            module = importlib.import_module(CLIENT)
            self.net = module.Net(self.node.is_local, self.node.known_origin)
        return self.net

    async def client(self) -> Net:
        """The pooled client, made at the first outbound request: a node that is only ever asked starts and idles
        without httpx, and the first request imports it off the event loop (requests that start meanwhile
        wait for the same import in their own thread; a check of sys.modules let them take a half-imported
        module: AttributeError on a node's first two concurrent requests)."""
        if self.net is None:
            await asyncio.to_thread(importlib.import_module, CLIENT)
        return self.open()

    async def aclose(self) -> None:
        if self.net is not None:
            await self.net.aclose()
            self.net = None

    def handles(self, url: str) -> bool:
        return url[:8].lower().startswith(SCHEMES)

    async def check(self, url: str, strict: bool) -> None:
        await (await self.client()).check(url, strict)

    async def request(self, method: str, url: str, *, json_body: Any = None, headers: dict | None = None,
                      timeout: float = 15.0, max_bytes: int = LARGE, strict: bool = False,
                      connect_timeout: float = 5.0) -> Reply:
        return await (await self.client()).request(method, url, json_body=json_body, headers=headers,
                                                   timeout=timeout, max_bytes=max_bytes, strict=strict,
                                                   connect_timeout=connect_timeout)

    def can_send(self, connection: dict, size: int) -> bool:
        url = connection.get("agent_url")
        return isinstance(url, str) and self.handles(url)

    async def send(self, connection: dict, path: str, payload: dict) -> Reply:
        return await self.request("POST", connection["agent_url"] + path, json_body=payload, timeout=15.0)
