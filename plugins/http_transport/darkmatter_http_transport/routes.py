"""Starlette routes for every mesh endpoint of docs/protocol.md §4.1 (WebRTC and bootstrap live elsewhere)."""

from __future__ import annotations

from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from darkmatter import mesh
from darkmatter.server import client_ip, error_response, read_json
from darkmatter.wire import ProtocolError


def caller_of(request: Request) -> mesh.Caller:
    # The scheme comes from the scope: building request.url just to read it cost a URL parse per request.
    return mesh.Caller(ip=client_ip(request.scope), host=request.headers.get("host", ""),
                       scheme=request.scope.get("scheme", "http"),
                       headers={k.lower(): v for k, v in request.headers.items()})


def build_routes(node) -> list[Route]:
    def post(handler: Callable[..., Awaitable[dict]], *, inactive_first: bool = False):
        async def endpoint(request: Request) -> JSONResponse:
            try:
                if inactive_first:
                    mesh.inactive_check(node)
                body = await read_json(request)
                return JSONResponse(await handler(node, body, caller_of(request)))
            except ProtocolError as exc:
                return error_response(exc)
            except OSError:  # the state could not be saved (disk full, read-only): a clear 503, not a trace
                return error_response(mesh.save_failed())
        return endpoint

    def get(handler: Callable[..., Awaitable[dict]], param: str | None = None):
        async def endpoint(request: Request) -> JSONResponse:
            try:
                args = (request.path_params[param],) if param else ()
                return JSONResponse(await handler(node, *args, caller_of(request)))
            except ProtocolError as exc:
                return error_response(exc)
        return endpoint

    async def webhook_post(request: Request) -> JSONResponse:
        try:
            body = await read_json(request)
            return JSONResponse(await mesh.webhook_post(node, request.path_params["message_id"], body,
                                                        caller_of(request)))
        except ProtocolError as exc:
            return error_response(exc)
        except OSError:
            return error_response(mesh.save_failed())

    async def well_known(request: Request) -> JSONResponse:
        caller = caller_of(request)
        try:
            node.rate.check("get_ip", *mesh.rate_key(caller, None))
        except ProtocolError as exc:
            return error_response(exc)
        return JSONResponse(mesh.well_known(node, caller))

    prefix = "/__darkmatter__/"
    return [
        Route(prefix + "connection_request", post(mesh.connection_request, inactive_first=True), methods=["POST"]),
        Route(prefix + "connection_accepted", post(mesh.connection_accepted), methods=["POST"]),
        Route(prefix + "connection_rejected", post(mesh.connection_rejected), methods=["POST"]),
        Route(prefix + "disconnect", post(mesh.disconnect), methods=["POST"]),
        Route(prefix + "message", post(mesh.message), methods=["POST"]),
        Route(prefix + "peer_update", post(mesh.peer_update), methods=["POST"]),
        Route(prefix + "webhook/{message_id}", webhook_post, methods=["POST"]),
        Route(prefix + "webhook/{message_id}", get(mesh.webhook_get, "message_id"), methods=["GET"]),
        Route(prefix + "impression/{agent_id}", get(mesh.impression, "agent_id"), methods=["GET"]),
        Route(prefix + "peer_lookup/{agent_id}", get(mesh.peer_lookup, "agent_id"), methods=["GET"]),
        Route(prefix + "status", get(mesh.status), methods=["GET"]),
        Route(prefix + "network_info", get(mesh.network_info), methods=["GET"]),
        Route("/.well-known/darkmatter.json", well_known, methods=["GET"]),
    ]
