"""The baseline: a bare Starlette route on hypercorn that verifies one Ed25519 signature.

    .venv/bin/python -m bench.bare_server --port 8199 [--agent-id HEX]

``POST /__darkmatter__/message`` (and ``/__darkmatter__/webhook/{id}``) parses the JSON body, rebuilds the
v2 message string a DarkMatter node verifies (docs/protocol.md §3.5) and checks the one signature against the
presented key; it stores nothing. ``GET /__darkmatter__/status`` answers for readiness. Hypercorn is
configured as the node configures it (no access log, same timeouts), so the difference between the two is
what a node does beyond parsing and one signature check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from darkmatter.identity import v2_message

DEFAULT_TO = "0" * 64


def build_app(to_id: str = DEFAULT_TO) -> Starlette:
    counter = {"accepted": 0}

    async def message(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(body["from_public_key_hex"]))
            text = v2_message(body["from_agent_id"], to_id, body["message_id"], body["timestamp"],
                              body["hops_remaining"], body["webhook"], body["content"], body.get("metadata") or {})
            key.verify(bytes.fromhex(body["signature_v2_hex"]), text.encode("utf-8"))
        except (ValueError, KeyError, TypeError, InvalidSignature):
            return JSONResponse({"error": "Invalid signature", "code": "invalid_signature"}, status_code=403)
        counter["accepted"] += 1
        return JSONResponse({"success": True, "queued": True, "queue_position": counter["accepted"]})

    async def status(request: Request) -> JSONResponse:
        return JSONResponse({"agent_id": to_id, "accepted": counter["accepted"]})

    return Starlette(routes=[Route("/__darkmatter__/message", message, methods=["POST"]),
                             Route("/__darkmatter__/webhook/{message_id}", message, methods=["POST"]),
                             Route("/__darkmatter__/status", status, methods=["GET"])])


def hypercorn_config(port: int) -> Config:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.read_timeout = 30
    config.keep_alive_timeout = 30
    config.graceful_timeout = 2
    config.h11_max_incomplete_size = 64 * 1024
    config.include_server_header = False
    config.backlog = 512
    return config


async def run(port: int, to_id: str, shutdown: asyncio.Event) -> None:
    await serve(build_app(to_id), hypercorn_config(port), shutdown_trigger=shutdown.wait)


async def main_async(port: int, to_id: str) -> None:
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown.set)
    await run(port, to_id, shutdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agent-id", default=DEFAULT_TO)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args.port, args.agent_id))


if __name__ == "__main__":
    main()
