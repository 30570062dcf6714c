"""The HTTP transport: the mesh's requests and envelopes over HTTP(S), with the node's pooled client."""

from __future__ import annotations

from typing import Any

from darkmatter.api import LARGE, Reply

from darkmatter_http_transport.client import Net

SCHEMES = ("http://", "https://")


class HttpTransport:
    name = "http"
    priority = 0

    def __init__(self, node):
        self.node = node
        self.net: Net | None = None  # opened by the plugin's lifespan, closed at shutdown

    def open(self) -> Net:
        if self.net is None:
            self.net = Net(self.node.is_local, self.node.known_origin)
        return self.net

    async def aclose(self) -> None:
        if self.net is not None:
            await self.net.aclose()
            self.net = None

    def handles(self, url: str) -> bool:
        return url[:8].lower().startswith(SCHEMES)

    async def check(self, url: str, strict: bool) -> None:
        await self.open().check(url, strict)

    async def request(self, method: str, url: str, *, json_body: Any = None, headers: dict | None = None,
                      timeout: float = 15.0, max_bytes: int = LARGE, strict: bool = False,
                      connect_timeout: float = 5.0) -> Reply:
        return await self.open().request(method, url, json_body=json_body, headers=headers, timeout=timeout,
                                         max_bytes=max_bytes, strict=strict, connect_timeout=connect_timeout)

    def can_send(self, connection: dict, size: int) -> bool:
        url = connection.get("agent_url")
        return isinstance(url, str) and self.handles(url)

    async def send(self, connection: dict, path: str, payload: dict) -> Reply:
        return await self.request("POST", connection["agent_url"] + path, json_body=payload, timeout=15.0)
