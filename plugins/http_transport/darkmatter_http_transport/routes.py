"""The mesh over HTTP, inbound: one Starlette route per operation of the kernel's ``ROUTES`` table, each a
thin adapter that parses the request, calls the kernel's ``handle`` and writes its answer (§2.1)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from darkmatter.api import (REFUSED_WHEN_INACTIVE, ROUTES, Caller, ProtocolError, client_ip, error_response, handle,
                            inactive_check, read_json)


def caller_of(request: Request) -> Caller:
    # The scheme comes from the scope: building request.url just to read it cost a URL parse per request.
    return Caller(ip=client_ip(request.scope), host=request.headers.get("host", ""),
                  scheme=request.scope.get("scheme", "http"),
                  headers={k.lower(): v for k, v in request.headers.items()})


def build_routes(node) -> list[Route]:
    def adapter(method: str, op: str, param: str | None):
        refuse_first = op in REFUSED_WHEN_INACTIVE

        async def endpoint(request: Request) -> JSONResponse:
            try:
                if refuse_first:
                    inactive_check(node)
                body = await read_json(request) if method == "POST" else None
                arg = request.path_params[param] if param else None
                return JSONResponse(await handle(node, op, caller_of(request), body, arg))
            except ProtocolError as exc:
                return error_response(exc)
        return endpoint

    return [Route(path, adapter(method, op, param), methods=[method]) for method, path, op, param in ROUTES]
