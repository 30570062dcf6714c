"""The HTTP transport: POST an envelope to a connection's base URL with the node's pooled client."""

from __future__ import annotations

from darkmatter.transport import Reply


class HttpTransport:
    name = "http"
    priority = 0

    def __init__(self, node):
        self.node = node

    def can_send(self, connection: dict, size: int) -> bool:
        return bool(connection.get("agent_url"))

    async def send(self, connection: dict, path: str, payload: dict) -> Reply:
        reply = await self.node.net.request("POST", connection["agent_url"] + path, json_body=payload,
                                            timeout=15.0)
        reply.transport = self.name
        return reply
