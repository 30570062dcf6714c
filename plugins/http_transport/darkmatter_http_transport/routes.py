"""The mesh over HTTP, inbound: one Starlette route per operation of the kernel's ``ROUTES`` table, each a
thin adapter that parses the request, calls the kernel's ``handle`` and writes its answer (§2.1)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from darkmatter.api import (REFUSED_WHEN_INACTIVE, ROUTES, Caller, JSONAnswer, ProtocolError, client_ip,
                            error_response, handle, inactive_check, read_json)


def caller_of(request: Request, trusted: frozenset = frozenset()) -> Caller:
    # The scheme comes from the scope: building request.url just to read it cost a URL parse per request. The
    # headers too: decoding the raw pairs once is cheaper than Starlette's Headers view (names are lowercase).
    scope = request.scope
    ip = client_ip(scope)
    raw = scope["headers"]
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}
    host = next((value.decode("latin-1") for name, value in raw if name.lower() == b"host"), "")
    return Caller(ip=ip, host=host, scheme=scope.get("scheme", "http"), headers=headers,
                  forwarded_for=forwarded_client(headers) if ip in trusted else None)


def forwarded_client(headers: dict) -> str | None:
    """The client address a trusted proxy put in ``X-Real-IP``, ``X-Forwarded-For`` (the entry it appended:
    the last) or ``Forwarded`` (``for=`` of the last element); None when it names none (§2.1)."""
    value = headers.get("x-real-ip") or (headers.get("x-forwarded-for") or "").split(",")[-1]
    if not value.strip() and headers.get("forwarded"):
        last = headers["forwarded"].split(",")[-1]
        value = next((part.split("=", 1)[1] for part in last.split(";")
                      if part.strip().lower().startswith("for=")), "")
    value = value.strip().strip('"')
    return value[:64] or None


def trusted_proxies(node) -> frozenset:
    raw = node.config.get_str("DARKMATTER_TRUSTED_PROXIES") or ""
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


def build_routes(node) -> list[Route]:
    trusted = trusted_proxies(node)

    def adapter(method: str, op: str, param: str | None):
        refuse_first = op in REFUSED_WHEN_INACTIVE

        async def endpoint(request: Request) -> JSONAnswer:
            try:
                if refuse_first:
                    inactive_check(node)
                body = await read_json(request) if method == "POST" else None
                arg = request.path_params[param] if param else None
                return JSONAnswer(await handle(node, op, caller_of(request, trusted), body, arg))
            except ProtocolError as exc:
                return error_response(exc)
        return endpoint

    return [Route(path, adapter(method, op, param), methods=[method]) for method, path, op, param in ROUTES]
