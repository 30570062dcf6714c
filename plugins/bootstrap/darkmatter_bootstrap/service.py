"""The node's bootstrap service (docs/protocol.md §4.11): its packages, prepared once per start off the
event loop, and the routes ``/bootstrap``, ``/bootstrap/server.py`` and ``/bootstrap/packages/{file}``.

Packing the wheels costs CPU, so it never competes with start-up: it begins :data:`PREPARE_AFTER` seconds
after the node started, or at once when something asks for the packages first (a request to one of the
routes, or ``darkmatter_get_server_template``), which then waits up to :data:`REQUEST_WAIT` seconds for it.

``/bootstrap`` is rendered per request; the only request-derived value in it is the origin URL, which is
the §4.2 Host-derived URL when it passes :data:`SAFE_ORIGIN` (else the node's own base URL) and is
single-quoted like every other embedded value. ``/bootstrap/server.py`` is rendered once, from the node's
own base URL, when the packages are ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from darkmatter.api import Caller, ProtocolError, agent_url_for, client_ip, error_response, rate_key

from darkmatter_bootstrap import scripts
from darkmatter_bootstrap.wheels import Package, build_packages

log = logging.getLogger(__name__)

NAME = "bootstrap"  # the plugin's name: its key in node.plugin_state
PREPARE_AFTER = 3.0  # seconds after start before the packages are packed, unless asked for earlier
REQUEST_WAIT = 15.0  # how long a request for the packages waits for them before answering "pending"
SAFE_ORIGIN = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")


class Bootstrap:
    """The node's package list and launcher, prepared once per start."""

    # NOTE: no reference back to the node: it is kept in the node's plugin state.
    def __init__(self) -> None:
        self.status = "pending"  # pending -> ready | failed
        self.error: str | None = None
        self.packages: dict[str, Package] = {}
        self.server_py = b""
        self.server_py_sha256 = ""
        self._task: asyncio.Task | None = None  # the preparation of the current run, once begun

    def reset(self) -> None:
        """A new run: nothing prepared, nothing begun."""
        self.status, self.error, self.packages = "pending", None, {}
        self._task = None

    def begin(self, node) -> asyncio.Task:
        """Begin preparing the packages now, once per run; the task that does it."""
        if self._task is None:
            self._task = node.spawn(self.prepare(node), name="bootstrap-packages")
        return self._task

    async def settled(self, node, timeout: float = REQUEST_WAIT) -> str:
        """Begin preparing if nothing did yet, wait up to ``timeout`` seconds for it, and return the status."""
        if self.status == "pending":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.begin(node)), timeout)
        return self.status

    @property
    def ordered(self) -> list[Package]:
        return list(self.packages.values())

    async def prepare(self, node) -> None:
        plugins = [p["name"] for p in node.plugin_list()]
        cache = Path(node.config.state_file).expanduser().parent / "bootstrap-cache"
        started = time.monotonic()
        try:
            built = await asyncio.to_thread(build_packages, plugins, cache)
            source = scripts.render_server_py(node.base_url, built)
        except Exception as exc:  # noqa: BLE001 - any failure means "unavailable", with the reason logged
            self.error = str(exc)
            self.status = "failed"
            log.error("bootstrap: packages are unavailable, /bootstrap will say so: %s", exc)
            return
        self.packages = {p.file: p for p in built}
        self.server_py = source.encode()
        self.server_py_sha256 = hashlib.sha256(self.server_py).hexdigest()
        self.status = "ready"
        log.info("bootstrap: serving %s (%.2f s)", ", ".join(self.packages), time.monotonic() - started)


def state_of(node) -> Bootstrap:
    return node.plugin_state(NAME, Bootstrap)


@contextlib.asynccontextmanager
async def lifespan(node):
    """Packs the wheels in the background, :data:`PREPARE_AFTER` seconds after start (or at the first request
    for them), when bootstrap is enabled (DARKMATTER_BOOTSTRAP)."""
    if node.config.bootstrap:
        state = state_of(node)
        state.reset()
        node.spawn(_begin_later(node, state), name="bootstrap-timer")
    yield


async def _begin_later(node, state: Bootstrap) -> None:
    await asyncio.sleep(PREPARE_AFTER)
    state.begin(node)


# --- routes --------------------------------------------------------------------------------------


def caller_of(request: Request) -> Caller:
    return Caller(ip=client_ip(request.scope), host=request.headers.get("host", ""),
                  scheme=request.scope.get("scheme", "http"),
                  headers={k.lower(): v for k, v in request.headers.items()})


def origin_for(node, caller: Caller) -> str:
    """§4.2/§4.11: the URL the requester used when its Host passes the pattern, else the node's own."""
    url = agent_url_for(node, caller).rstrip("/")
    return url if SAFE_ORIGIN.match(url) else node.base_url.rstrip("/")


def build_routes(node) -> list[Route]:
    state = state_of(node)
    not_found = ProtocolError(404, "not_found", "Not found")
    text = "text/plain; charset=utf-8"
    python = "text/x-python; charset=utf-8"

    def limited(caller: Caller) -> Response | None:
        try:
            node.rate.check("get_ip", *rate_key(caller, None))
        except ProtocolError as exc:
            return error_response(exc)
        return None

    def unready(kind: str, media: str) -> Response:
        if state.status == "failed":
            return Response(scripts.TEMPLATES[f"unavailable.{kind}"], status_code=503, media_type=media)
        return Response(scripts.TEMPLATES[f"pending.{kind}"], status_code=503, media_type=media,
                        headers={"Retry-After": "5"})

    async def script(request: Request) -> Response:
        caller = caller_of(request)
        refused = limited(caller)
        if refused is not None:
            return refused
        if await state.settled(node) != "ready":
            return unready("sh", text)
        body = scripts.render_script(origin_for(node, caller), state.ordered)
        return Response(body, media_type=text, headers={"Cache-Control": "no-store"})

    async def server_py(request: Request) -> Response:
        refused = limited(caller_of(request))
        if refused is not None:
            return refused
        if await state.settled(node) != "ready":
            return unready("py", python)
        return Response(state.server_py, media_type=python,
                        headers={"X-DarkMatter-Source-SHA256": state.server_py_sha256})

    async def package(request: Request) -> Response:
        refused = limited(caller_of(request))
        if refused is not None:
            return refused
        pkg = state.packages.get(request.path_params["file"]) if await state.settled(node) == "ready" else None
        if pkg is None:
            return error_response(not_found)
        return Response(pkg.data, media_type="application/octet-stream",
                        headers={"X-DarkMatter-Source-SHA256": pkg.sha256,
                                 "Content-Disposition": f'attachment; filename="{pkg.file}"'})

    return [Route("/bootstrap", script, methods=["GET"]),
            Route("/bootstrap/server.py", server_py, methods=["GET"]),
            Route("/bootstrap/packages/{file}", package, methods=["GET"])]
