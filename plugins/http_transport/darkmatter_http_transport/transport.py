"""The HTTP transport: the mesh's requests and envelopes over HTTP(S), with the node's pooled client."""

from __future__ import annotations

import asyncio
import importlib
import sys
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
            module = sys.modules.get(CLIENT) or importlib.import_module(CLIENT)
            self.net = module.Net(self.node.is_local, self.node.known_origin)
        return self.net

    async def client(self) -> Net:
        """The pooled client, made at the first outbound request: a node that is only ever asked starts and idles
        without httpx, and the first request imports it off the event loop."""
        if self.net is None and CLIENT not in sys.modules:
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
