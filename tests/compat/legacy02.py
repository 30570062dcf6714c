"""A stand-in for a node of the original implementation (protocol 0.2), for mixed-network tests.

A real HTTP server on loopback (Starlette on hypercorn, its own port) that speaks the 0.2 wire as
docs/protocol.md describes it: UUID agent id, unsigned handshakes that present the Ed25519 key, v1 message
signatures only, unsigned ``forwarded`` updates, an ``/mcp`` suffix on the ``agent_url`` it hands out, no
``connection_rejected``/``disconnect`` endpoints (404), and an impression endpoint that ignores the 0.3
signature headers. It shares no code with the node under test: it signs with ``cryptography`` directly.

What the 0.2 node's own agent would do through its tools is a method here (``request_connection``,
``accept``, ``send``, ``forward``, ``respond``), with the 0.2 rules that matter across implementations:
exact-string webhook checks (a loopback webhook only when its origin is its own or a connection's URL) and
loop detection from the GET webhook's ``updates[].target_agent_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

PROTOCOL_VERSION = "0.2"


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def base_of(url: str) -> str:
    """The 0.2 way to reach a peer: strip one ``/mcp`` or ``/__darkmatter__`` suffix."""
    url = url.rstrip("/")
    for suffix in ("/mcp", "/__darkmatter__"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def v1_bytes(agent_id: str, message_id: str, timestamp: str, text: str) -> bytes:
    return f"{agent_id}\n{message_id}\n{timestamp}\n{text}".encode()


def v1_valid(public_key_hex: str | None, signature_hex: str | None, *fields: str) -> bool:
    if not public_key_hex or not signature_hex:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(
            bytes.fromhex(signature_hex), v1_bytes(*fields))
    except (InvalidSignature, ValueError):
        return False
    return True


class Legacy02Node:
    """One 0.2 node: ``async with Legacy02Node(genesis=True) as node: node.base_url``."""

    def __init__(self, name: str = "legacy", *, genesis: bool = False, bio: str = "A 0.2 agent."):
        self.key = Ed25519PrivateKey.generate()
        self.public_key_hex = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        self.agent_id = str(uuid.uuid4())
        self.display_name = name
        self.bio = bio
        self.genesis = genesis
        self.connections: dict[str, dict] = {}
        self.pending_requests: dict[str, dict] = {}
        self.pending_outbound: set[str] = set()
        self.queue: list[dict] = []
        self.sent: dict[str, dict] = {}
        self.impressions: dict[str, str] = {}
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status) of every request it answered
        self.port = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- the server -------------------------------------------------------------------------------

    async def __aenter__(self) -> Legacy02Node:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        config = Config()
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
        sock.close()
        config.accesslog = None
        config.errorlog = logging.getLogger("legacy02")
        config.graceful_timeout = 1
        self._task = asyncio.get_running_loop().create_task(
            serve(self._logged(self.app()), config, shutdown_trigger=self._stop.wait))
        async with self.http() as http:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{self.base_url}/.well-known/darkmatter.json")).status_code == 200:
                        return self
                await asyncio.sleep(0.02)
        raise TimeoutError("the 0.2 stand-in did not start")

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)

    def _logged(self, app):
        async def wrapper(scope, receive, send):
            status = {}

            async def capture(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            await app(scope, receive, capture)
            if scope["type"] == "http":
                self.seen.append((scope["method"], scope["path"], status.get("code", 0)))
        return wrapper

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/.well-known/darkmatter.json", self.well_known, methods=["GET"]),
            Route("/__darkmatter__/status", self.status, methods=["GET"]),
            Route("/__darkmatter__/connection_request", self.on_connection_request, methods=["POST"]),
            Route("/__darkmatter__/connection_accepted", self.on_connection_accepted, methods=["POST"]),
            Route("/__darkmatter__/message", self.on_message, methods=["POST"]),
            Route("/__darkmatter__/webhook/{message_id}", self.webhook, methods=["GET", "POST"]),
            Route("/__darkmatter__/impression/{agent_id}", self.impression, methods=["GET"]),
            Route("/__darkmatter__/peer_lookup/{agent_id}", self.peer_lookup, methods=["GET"]),
        ])

    def identity(self) -> dict:
        return {"agent_id": self.agent_id, "display_name": self.display_name, "public_key_hex": self.public_key_hex,
                "bio": self.bio, "status": "active", "accepting_connections": True}

    async def well_known(self, request: Request) -> JSONResponse:
        return JSONResponse({"darkmatter": True, "protocol_version": PROTOCOL_VERSION, **self.identity(),
                             "mesh_url": f"{self.base_url}/__darkmatter__", "mcp_url": f"{self.base_url}/mcp",
                             "webrtc_enabled": False})

    async def status(self, request: Request) -> JSONResponse:
        return JSONResponse({**self.identity(), "num_connections": len(self.connections)})

    def accept_body(self) -> dict:
        return {"agent_id": self.agent_id, "agent_url": f"{self.base_url}/mcp", "agent_bio": self.bio,
                "agent_public_key_hex": self.public_key_hex, "agent_display_name": self.display_name}

    async def on_connection_request(self, request: Request) -> JSONResponse:
        data = await request.json()
        from_id, from_url = data.get("from_agent_id"), data.get("from_agent_url")
        if not from_id or not from_url:
            return JSONResponse({"error": "Missing required fields"}, status_code=400)
        if from_id in self.connections:
            return JSONResponse({"auto_accepted": True, **self.accept_body(), "message": "Already connected."})
        fields = {"agent_id": from_id, "agent_url": from_url, "agent_bio": data.get("from_agent_bio") or "",
                  "agent_public_key_hex": data.get("from_agent_public_key_hex"),
                  "agent_display_name": data.get("from_agent_display_name")}
        if self.genesis:
            self.connections[from_id] = dict(fields, direction="inbound", connected_at=now())
            return JSONResponse({"auto_accepted": True, **self.accept_body()})
        request_id = f"req-{uuid.uuid4().hex[:8]}"
        self.pending_requests[request_id] = dict(fields, request_id=request_id, requested_at=now())
        return JSONResponse({"auto_accepted": False, "request_id": request_id,
                             "message": "Connection request queued. Awaiting agent decision."})

    async def on_connection_accepted(self, request: Request) -> JSONResponse:
        data = await request.json()
        agent_id, agent_url = data.get("agent_id"), data.get("agent_url")
        if not agent_id or not agent_url:
            return JSONResponse({"error": "Missing required fields"}, status_code=400)
        matched = next((p for p in self.pending_outbound if base_of(p) == base_of(agent_url)), None)
        if matched is None:
            return JSONResponse({"error": "No pending outbound connection request for this agent."},
                                status_code=403)
        self.pending_outbound.discard(matched)
        self.connections[agent_id] = {"agent_id": agent_id, "agent_url": agent_url,
                                      "agent_bio": data.get("agent_bio") or "", "direction": "outbound",
                                      "agent_public_key_hex": data.get("agent_public_key_hex"),
                                      "agent_display_name": data.get("agent_display_name"), "connected_at": now()}
        return JSONResponse({"success": True})

    async def on_message(self, request: Request) -> JSONResponse:
        data = await request.json()
        for name in ("message_id", "content", "webhook", "from_agent_id"):
            if not isinstance(data.get(name), str) or not data[name]:
                return JSONResponse({"error": "Missing required fields"}, status_code=400)
        conn = self.connections.get(data["from_agent_id"])
        if conn is None:
            return JSONResponse({"error": "Not connected — only connected agents can send messages."},
                                status_code=403)
        verified = False
        key = conn.get("agent_public_key_hex")
        if data.get("signature_hex") and key:
            if data.get("from_public_key_hex") and data["from_public_key_hex"] != key:
                return JSONResponse({"error": "Public key mismatch"}, status_code=403)
            if not v1_valid(key, data["signature_hex"], data["from_agent_id"], data["message_id"],
                            data.get("timestamp") or "", data["content"]):
                return JSONResponse({"error": "Invalid signature"}, status_code=403)
            verified = True
        self.queue.append({"message_id": data["message_id"], "content": data["content"], "webhook": data["webhook"],
                           "hops_remaining": data.get("hops_remaining", 10), "metadata": data.get("metadata") or {},
                           "from_agent_id": data["from_agent_id"], "verified": verified, "received_at": now()})
        return JSONResponse({"success": True, "queued": True, "queue_position": len(self.queue)})

    async def webhook(self, request: Request) -> JSONResponse:
        message_id = request.path_params["message_id"]
        sent = self.sent.get(message_id)
        if sent is None:
            return JSONResponse({"error": f"No sent message with ID '{message_id}'"}, status_code=404)
        if request.method == "GET":
            return JSONResponse({key: sent[key] for key in ("message_id", "status", "initial_hops", "created_at",
                                                            "updates")})
        data = await request.json()
        kind = data.get("type")
        if kind in ("forwarded", "expired"):
            sent["updates"].append({"type": kind, "agent_id": data.get("agent_id"),
                                    "target_agent_id": data.get("target_agent_id"), "note": data.get("note"),
                                    "timestamp": now()})
        elif kind == "response":
            responder = self.connections.get(data.get("agent_id") or "") or {}
            verified = v1_valid(responder.get("agent_public_key_hex") or data.get("from_public_key_hex"),
                                data.get("signature_hex"), data.get("agent_id") or "", message_id,
                                data.get("timestamp") or "", data.get("response") or "")
            sent["response"] = {"agent_id": data.get("agent_id"), "response": data.get("response"),
                                "metadata": data.get("metadata"), "timestamp": now(), "verified": verified}
            sent["status"] = "responded"
        else:
            return JSONResponse({"error": f"Unknown update type: '{kind}'"}, status_code=400)
        return JSONResponse({"success": True})

    async def impression(self, request: Request) -> JSONResponse:
        about = request.path_params["agent_id"]  # 0.2 ignores the X-DarkMatter-* headers
        text = self.impressions.get(about)
        if text is None:
            return JSONResponse({"agent_id": about, "has_impression": False})
        return JSONResponse({"agent_id": about, "has_impression": True, "impression": text})

    async def peer_lookup(self, request: Request) -> JSONResponse:
        conn = self.connections.get(request.path_params["agent_id"])
        if conn is None:
            return JSONResponse({"error": "Not connected to that agent"}, status_code=404)
        return JSONResponse({"agent_id": conn["agent_id"], "url": base_of(conn["agent_url"]), "status": "connected"})

    # --- what the 0.2 node's agent does through its tools -------------------------------------------

    @staticmethod
    def http() -> httpx.AsyncClient:
        return httpx.AsyncClient(trust_env=False, timeout=30.0)

    def sign(self, message_id: str, timestamp: str, text: str) -> str:
        return self.key.sign(v1_bytes(self.agent_id, message_id, timestamp, text)).hex()

    async def request_connection(self, target_url: str) -> dict:
        target = base_of(target_url)
        async with self.http() as http:
            reply = await http.post(f"{target}/__darkmatter__/connection_request", json={
                "from_agent_id": self.agent_id, "from_agent_url": self.base_url, "from_agent_bio": self.bio,
                "from_agent_public_key_hex": self.public_key_hex, "from_agent_display_name": self.display_name})
        result = reply.json()
        if result.get("auto_accepted"):
            self.connections[result["agent_id"]] = {
                "agent_id": result["agent_id"], "agent_url": result["agent_url"],
                "agent_bio": result.get("agent_bio") or "", "direction": "outbound",
                "agent_public_key_hex": result.get("agent_public_key_hex"),
                "agent_display_name": result.get("agent_display_name"), "connected_at": now()}
        elif reply.status_code == 200:
            self.pending_outbound.add(target)
        return result

    async def accept(self, request_id: str) -> int:
        request = self.pending_requests.pop(request_id)
        self.connections[request["agent_id"]] = {k: v for k, v in request.items()
                                                 if k not in ("request_id", "requested_at")}
        self.connections[request["agent_id"]].update(direction="inbound", connected_at=now())
        async with self.http() as http:
            reply = await http.post(base_of(request["agent_url"]) + "/__darkmatter__/connection_accepted",
                                    json=self.accept_body())
        return reply.status_code

    async def send(self, target_agent_id: str, content: str, *, hops: int = 10, metadata: dict | None = None) -> dict:
        conn = self.connections[target_agent_id]
        message_id = f"msg-{uuid.uuid4().hex[:12]}"
        webhook = f"{self.base_url}/__darkmatter__/webhook/{message_id}"
        ts = now()
        body = {"message_id": message_id, "content": content, "webhook": webhook, "hops_remaining": hops,
                "from_agent_id": self.agent_id, "metadata": metadata or {}, "timestamp": ts,
                "from_public_key_hex": self.public_key_hex, "signature_hex": self.sign(message_id, ts, content)}
        async with self.http() as http:
            reply = await http.post(base_of(conn["agent_url"]) + "/__darkmatter__/message", json=body)
        self.sent[message_id] = {"message_id": message_id, "content": content, "status": "active",
                                 "initial_hops": hops, "routed_to": [target_agent_id] if reply.status_code == 200
                                 else [], "created_at": now(), "updates": [], "response": None}
        return {"status_code": reply.status_code, "message_id": message_id, "reply": reply.json()}

    def webhook_allowed(self, webhook: str) -> bool:
        """0.2: a loopback/private webhook only on its own origin or a connection's, spelled exactly."""
        known = {origin(self.base_url)} | {origin(c["agent_url"]) for c in self.connections.values()}
        return "/__darkmatter__/webhook/" in webhook and origin(webhook) in known

    def queued(self, message_id: str) -> dict:
        return next(m for m in self.queue if m["message_id"] == message_id)

    async def forward(self, message_id: str, target_agent_id: str, note: str | None = None) -> dict:
        msg = self.queued(message_id)
        conn = self.connections[target_agent_id]
        if not self.webhook_allowed(msg["webhook"]):
            return {"success": False, "error": "Webhook blocked"}
        async with self.http() as http:
            state = (await http.get(msg["webhook"])).json()
            if state.get("status") in ("expired", "responded"):
                return {"success": False, "error": f"Message is already {state['status']}"}
            if any(u.get("target_agent_id") == target_agent_id for u in state.get("updates", [])):
                return {"success": False, "error": "already received"}
            await http.post(msg["webhook"], json={"type": "forwarded", "agent_id": self.agent_id,
                                                  "target_agent_id": target_agent_id, "note": note})
            ts = now()
            reply = await http.post(base_of(conn["agent_url"]) + "/__darkmatter__/message", json={
                "message_id": message_id, "content": msg["content"], "webhook": msg["webhook"],
                "hops_remaining": msg["hops_remaining"] - 1, "from_agent_id": self.agent_id,
                "metadata": msg["metadata"], "timestamp": ts, "from_public_key_hex": self.public_key_hex,
                "signature_hex": self.sign(message_id, ts, msg["content"])})
        return {"success": reply.status_code == 200, "status_code": reply.status_code, "reply": reply.json()}

    async def respond(self, message_id: str, response: str) -> dict:
        msg = self.queued(message_id)
        if not self.webhook_allowed(msg["webhook"]):
            return {"success": False, "error": "Webhook blocked"}
        self.queue.remove(msg)
        ts = now()
        async with self.http() as http:
            reply = await http.post(msg["webhook"], json={
                "type": "response", "agent_id": self.agent_id, "response": response, "metadata": msg["metadata"],
                "timestamp": ts, "from_public_key_hex": self.public_key_hex,
                "signature_hex": self.sign(message_id, ts, response)})
        return {"success": reply.status_code < 400, "status_code": reply.status_code, "reply": reply.json()}

    def saw(self, method: str, path: str) -> list[int]:
        """The statuses it answered to ``method path``."""
        return [status for m, p, status in self.seen if m == method and p == path]
