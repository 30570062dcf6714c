"""Self-replication (docs/protocol.md §4.11): ``/bootstrap``, ``/bootstrap/server.py``,
``/bootstrap/packages/{file}`` and the ``darkmatter_get_server_template`` tool.

At startup (off the event loop) the node packs the kernel and every plugin it runs into wheels: a
wheel is built from the installed distribution itself (its dist-info metadata plus the files of its
import packages; for an editable install those files come from the source tree). That needs no build
backend or network, and a node installed this way can bootstrap the next one in turn. Wheels are
deterministic and cached by source hash under ``<state dir>/bootstrap-cache``.

``/bootstrap`` is a POSIX shell script rendered per request; the only request-derived value in it is
the origin URL, which is the §4.2 Host-derived URL (else the node's own base URL) and is single-quoted
like every other embedded value. ``/bootstrap/server.py`` does the same from Python (stdlib only); it
is rendered once, when the packages are ready.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from darkmatter import PROTOCOL_VERSION, __version__, mesh
from darkmatter.plugins import GROUP, active_plugins
from darkmatter.server import error_response
from darkmatter.tools import Tool
from darkmatter.wire import ProtocolError

from darkmatter_http_transport.templates import SHELL_TEMPLATE, PY_COMMON, PY_CLI, SERVER_HEAD, PY_MAIN

log = logging.getLogger(__name__)

WHEEL_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+!-]*\.whl$")
SAFE_ORIGIN = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")
SKIP_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "RECORD.jws", "RECORD.p7s"}
MAX_FILES = 5000
MAX_BYTES = 64 * 1024 * 1024
CACHE_TTL = 14 * 24 * 3600
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class PackagingError(Exception):
    """A distribution cannot be packed into a wheel; the message says which one and why."""


@dataclass(frozen=True)
class Package:
    file: str
    sha256: str
    distribution: str
    version: str
    role: str  # "kernel" or "plugin"
    plugin: str | None
    data: bytes


# --- wheels from installed distributions ---------------------------------------------------------


def _editable(dist) -> bool:
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return False
    return bool(isinstance(info, dict) and (info.get("dir_info") or {}).get("editable"))


def _add(entries: dict[str, bytes], name: str, path: Path) -> None:
    if len(entries) >= MAX_FILES:
        raise PackagingError(f"more than {MAX_FILES} files")
    if path.stat().st_size > MAX_BYTES:
        raise PackagingError(f"{name} is larger than {MAX_BYTES} bytes")
    entries[name] = path.read_bytes()


def _add_tree(entries: dict[str, bytes], top: str) -> None:
    """The files of one top-level import package (or module), as the running interpreter finds it."""
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise PackagingError(f"import package {top!r} not found")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        if not spec.origin or not spec.origin.endswith(".py"):
            raise PackagingError(f"{top!r} is not a pure-Python module")
        _add(entries, f"{top}.py", Path(spec.origin))
        return
    if len(locations) != 1:
        raise PackagingError(f"{top!r} is a namespace package spread over {len(locations)} directories")
    root = Path(locations[0])
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs
                         if d != "__pycache__" and not d.startswith(".") and not d.endswith(".egg-info"))
        for name in sorted(files):
            if name.startswith(".") or name.endswith((".pyc", ".pyo")):
                continue
            path = Path(folder, name)
            _add(entries, f"{top}/{path.relative_to(root).as_posix()}", path)


def collect(dist, fallback_tops: list[str]) -> tuple[str, dict[str, bytes]]:
    """(dist-info directory name, {path in wheel: bytes}) of an installed distribution."""
    files = dist.files
    if not files:
        raise PackagingError("it has no RECORD of its files")
    info_dir = next((p.parent.as_posix() for p in files
                     if p.name == "METADATA" and p.parent.name.endswith(".dist-info")), None)
    if info_dir is None or "/" in info_dir:
        raise PackagingError("its .dist-info directory is missing from its RECORD")
    editable = _editable(dist)
    entries: dict[str, bytes] = {}
    for p in files:
        rel = p.as_posix()
        if rel.startswith(info_dir + "/"):
            if p.name in SKIP_INFO:
                continue
        elif editable or rel.startswith("../") or "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo"):
            continue  # scripts (../bin) are regenerated from entry_points.txt; bytecode is rebuilt
        path = Path(dist.locate_file(p))
        if path.is_file():
            _add(entries, rel, path)
    if editable:
        tops = (dist.read_text("top_level.txt") or "").split() or fallback_tops
        for top in tops:
            _add_tree(entries, top)
    if f"{info_dir}/METADATA" not in entries:
        raise PackagingError("its METADATA file is unreadable")
    if sum(len(v) for v in entries.values()) > MAX_BYTES:
        raise PackagingError(f"its files exceed {MAX_BYTES} bytes")
    return info_dir, entries


def _b64_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(info_dir: str, entries: dict[str, bytes]) -> tuple[str, bytes]:
    """A deterministic wheel (same files, same bytes) with a fresh RECORD. Returns (filename, data)."""
    entries = dict(entries)
    wheel_meta = entries.get(f"{info_dir}/WHEEL", b"").decode("utf-8", "replace")
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    if not tags:
        tags = ["py3-none-any"]
        entries[f"{info_dir}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: darkmatter-bootstrap\n"
                                         b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    filename = f"{info_dir[:-len('.dist-info')]}-{tags[0]}.whl"
    if not WHEEL_FILE.match(filename) or ".." in filename:
        raise PackagingError(f"unusable wheel name {filename!r}")
    order = sorted(n for n in entries if not n.startswith(info_dir + "/"))
    order += sorted(n for n in entries if n.startswith(info_dir + "/"))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in order + [f"{info_dir}/RECORD"]:
            if name.endswith("/RECORD") and name == f"{info_dir}/RECORD":
                writer.writerow([name, "", ""])
                data = record.getvalue().encode()
            else:
                data = entries[name]
                writer.writerow([name, "sha256=" + _b64_digest(data), str(len(data))])
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            zf.writestr(info, data)
    return filename, buf.getvalue()


def source_hash(entries: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(name.encode() + b"\0" + hashlib.sha256(entries[name]).digest())
    return digest.hexdigest()


def build_packages(plugins: list[tuple[str, str]], cache: Path) -> list[Package]:
    """Wheels of the kernel and of the given plugins ``(entry point name, module)``. Blocking: run it in a
    thread. Raises :class:`PackagingError` naming the distribution that failed."""
    from importlib import metadata

    def installed(name: str):
        # NOTE: a source checkout on sys.path shadows the installed copy with its *.egg-info (no RECORD);
        # take the first distribution of that name that has a .dist-info.
        for dist in metadata.distributions(name=name):
            if any(p.name == "METADATA" and p.parent.name.endswith(".dist-info") for p in dist.files or ()):
                return dist
        raise PackagingError(f"{name} is not installed as a distribution with a .dist-info")

    eps = {ep.name: ep for ep in metadata.entry_points(group=GROUP)}
    targets = [("kernel", None, installed("darkmatter"), ["darkmatter"])]
    for name, module in plugins:
        ep = eps.get(name)
        if ep is None or getattr(ep, "dist", None) is None:
            log.info("bootstrap: plugin %r is not an installed distribution; it is not offered", name)
            continue
        targets.append(("plugin", name, installed(ep.dist.name), [module.split(".")[0]]))
    cache.mkdir(parents=True, exist_ok=True)
    packages: list[Package] = []
    seen: set[str] = set()
    used: set[str] = set()
    for role, plugin, dist, tops in targets:
        if dist.name in seen:
            continue
        seen.add(dist.name)
        try:
            info_dir, entries = collect(dist, tops)
            key = source_hash(entries)[:32]
            used.add(key)
            slot = cache / key
            cached = sorted(slot.glob("*.whl")) if slot.is_dir() else []
            if cached:
                filename, data = cached[0].name, cached[0].read_bytes()
                os.utime(slot)
            else:
                filename, data = make_wheel(info_dir, entries)
                tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
                (tmp / filename).write_bytes(data)
                try:
                    os.replace(tmp, slot)
                except OSError:  # another node sharing this state directory got there first
                    shutil.rmtree(tmp, ignore_errors=True)
        except (OSError, ValueError, PackagingError) as exc:
            raise PackagingError(f"cannot package {dist.name} {dist.version}: {exc}") from exc
        packages.append(Package(filename, hashlib.sha256(data).hexdigest(), dist.name, dist.version, role,
                                plugin, data))
    for slot in cache.iterdir():
        with contextlib.suppress(OSError):
            if slot.name not in used and time.time() - slot.stat().st_mtime > CACHE_TTL:
                shutil.rmtree(slot, ignore_errors=True)
    return packages


# --- rendering -----------------------------------------------------------------------------------


def shq(value: str) -> str:
    """One single-quoted shell word holding exactly ``value``."""
    if not isinstance(value, str) or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("refusing to embed a value with control characters in a shell script")
    return "'" + value.replace("'", "'\"'\"'") + "'"


def package_set(packages: list[Package]) -> str:
    return hashlib.sha256("".join(f"{p.file} {p.sha256}\n" for p in packages).encode()).hexdigest()


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace every @@MARKER@@ in one pass: an inserted value is never scanned for markers again."""
    return re.sub(r"@@[A-Z_]+@@", lambda m: values[m.group(0)], template)


def render_script(origin: str, packages: list[Package]) -> str:
    fetch = "\n".join(f'    dm_fetch {shq(p.file)} {shq(p.sha256)}\n    set -- "$@" "$DM_PKG_DIR"/{shq(p.file)}'
                      for p in packages)
    values = {"@@ORIGIN@@": shq(origin.rstrip("/")), "@@KERNEL_VERSION@@": shq(__version__),
              "@@PACKAGE_SET@@": shq(package_set(packages)), "@@FETCH@@": fetch,
              "@@HELPER@@": PY_COMMON + PY_CLI}
    return _fill(SHELL_TEMPLATE, values)


def render_server_py(origin: str, packages: list[Package]) -> str:
    values = {"@@ORIGIN@@": json.dumps(origin.rstrip("/")), "@@KERNEL_VERSION@@": json.dumps(__version__),
              "@@PACKAGE_SET@@": json.dumps(package_set(packages)),
              "@@PACKAGES@@": json.dumps([[p.file, p.sha256] for p in packages])}
    return _fill(SERVER_HEAD, values) + PY_COMMON + PY_MAIN


def origin_for(node, request: Request) -> str:
    """§4.2/§4.11: the URL the requester used when its Host passes the pattern, else the node's own."""
    from darkmatter_http_transport.routes import caller_of

    url = mesh.agent_url_for(node, caller_of(request)).rstrip("/")
    return url if SAFE_ORIGIN.match(url) else node.base_url.rstrip("/")


PENDING_SH = ("#!/bin/sh\necho 'darkmatter-bootstrap: this node is still preparing its packages; "
              "try again in a few seconds.' >&2\nexit 1\n")
UNAVAILABLE_SH = ("#!/bin/sh\necho 'darkmatter-bootstrap: packages are unavailable: this node could not package the "
                  "DarkMatter kernel and its plugins (its operator finds the reason in the node log).' >&2\nexit 1\n")
PENDING_PY = "import sys\nsys.exit('darkmatter-bootstrap: this node is still preparing its packages; try again.')\n"
UNAVAILABLE_PY = ("import sys\nsys.exit('darkmatter-bootstrap: packages are unavailable: this node could not package "
                  "the DarkMatter kernel and its plugins.')\n")


# --- per-node state ------------------------------------------------------------------------------


class Bootstrap:
    """The node's package list and launcher, prepared once per start."""

    # NOTE: no reference back to the node: instances live in a WeakKeyDictionary keyed by it.
    def __init__(self):
        self.status = "pending"  # pending -> ready | failed
        self.error: str | None = None
        self.packages: dict[str, Package] = {}
        self.server_py = b""
        self.server_py_sha256 = ""

    @property
    def ordered(self) -> list[Package]:
        return list(self.packages.values())

    async def prepare(self, node) -> None:
        plugins = [(i.name, i.module) for i in active_plugins(node.pm)]
        cache = Path(node.config.state_file).expanduser().parent / "bootstrap-cache"
        started = time.monotonic()
        try:
            built = await asyncio.to_thread(build_packages, plugins, cache)
            source = await asyncio.to_thread(render_server_py, node.base_url, built)
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


_per_node: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def for_node(node) -> Bootstrap:
    state = _per_node.get(node)
    if state is None:
        state = _per_node[node] = Bootstrap()
    return state


@contextlib.asynccontextmanager
async def lifespan(node, inner):
    """The plugin's lifespan ``inner``, plus the package build when bootstrap is enabled."""
    async with inner:
        if node.config.bootstrap:
            state = for_node(node)
            state.status, state.packages = "pending", {}
            node.spawn(state.prepare(node), name="bootstrap-packages")
        yield


# --- routes --------------------------------------------------------------------------------------


def build_routes(node) -> list[Route]:
    state = for_node(node)
    not_found = ProtocolError(404, "not_found", "Not found")

    def limited(request: Request) -> Response | None:
        from darkmatter_http_transport.routes import caller_of

        try:
            node.rate.check("get_ip", *mesh.rate_key(caller_of(request), None))
        except ProtocolError as exc:
            return error_response(exc)
        return None

    def unready(pending: str, unavailable: str, media: str) -> Response:
        if state.status == "failed":
            return Response(unavailable, status_code=503, media_type=media)
        return Response(pending, status_code=503, media_type=media, headers={"Retry-After": "5"})

    async def script(request: Request) -> Response:
        refused = limited(request)
        if refused is not None:
            return refused
        if state.status != "ready":
            return unready(PENDING_SH, UNAVAILABLE_SH, "text/plain; charset=utf-8")
        text = render_script(origin_for(node, request), state.ordered)
        return Response(text, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"})

    async def server_py(request: Request) -> Response:
        refused = limited(request)
        if refused is not None:
            return refused
        if state.status != "ready":
            return unready(PENDING_PY, UNAVAILABLE_PY, "text/x-python; charset=utf-8")
        return Response(state.server_py, media_type="text/x-python; charset=utf-8",
                        headers={"X-DarkMatter-Source-SHA256": state.server_py_sha256})

    async def package(request: Request) -> Response:
        refused = limited(request)
        if refused is not None:
            return refused
        pkg = state.packages.get(request.path_params["file"]) if state.status == "ready" else None
        if pkg is None:
            return error_response(not_found)
        return Response(pkg.data, media_type="application/octet-stream",
                        headers={"X-DarkMatter-Source-SHA256": pkg.sha256,
                                 "Content-Disposition": f'attachment; filename="{pkg.file}"'})

    return [Route("/bootstrap", script, methods=["GET"]),
            Route("/bootstrap/server.py", server_py, methods=["GET"]),
            Route("/bootstrap/packages/{file}", package, methods=["GET"])]


# --- the server template tool ---------------------------------------------------------------------


PRIMITIVES = [
    {"name": "connect", "tool": "darkmatter_request_connection", "endpoint": "POST /__darkmatter__/connection_request",
     "summary": "Ask a node (by URL) for a connection; a genesis node accepts at once, others queue the request "
                "(docs/protocol.md §4.2, §4.3)."},
    {"name": "accept / reject", "tool": "darkmatter_respond_connection",
     "endpoint": "POST /__darkmatter__/connection_accepted, /__darkmatter__/connection_rejected",
     "summary": "Decide a queued incoming request; the requester is told either way (§4.4, §4.5)."},
    {"name": "disconnect", "tool": "darkmatter_disconnect", "endpoint": "POST /__darkmatter__/disconnect",
     "summary": "Drop a connection locally and tell the peer once (§4.6)."},
    {"name": "message (with webhook)", "tool": "darkmatter_send_message",
     "endpoint": "POST /__darkmatter__/message; POST/GET /__darkmatter__/webhook/{message_id}",
     "summary": "Send to one connection or all; each message carries the originator's webhook, where "
                "forwarders report hops and the recipient posts its response (§4.7, §5). See also "
                "darkmatter_forward_message and darkmatter_respond_message."},
]


def template(node) -> dict:
    state = for_node(node)
    base = node.base_url.rstrip("/")
    files = [{"file": p.file, "sha256": p.sha256, "distribution": p.distribution, "version": p.version,
              "role": p.role, "url": f"{base}/bootstrap/packages/{p.file}"} for p in state.ordered]
    if not node.config.bootstrap:
        availability = "disabled on this node (DARKMATTER_BOOTSTRAP=false): the /bootstrap routes answer 404"
    else:
        availability = {"pending": "being prepared; ask again in a few seconds",
                        "ready": "ready", "failed": "unavailable: this node could not package itself"}[state.status]
    dists = {p.plugin: p.distribution for p in state.ordered if p.plugin}
    return {
        "recommendation": "This template is a recommendation, not a requirement: the new node may change any "
                          "part of it (plugins, settings, even the implementation) as long as it speaks the "
                          "protocol.",
        "implementation": {"kernel": {"distribution": "darkmatter", "version": __version__},
                           "plugins": [dict(p, distribution=dists.get(p["name"])) for p in node.plugin_list()]},
        "packages": {"availability": availability, "bootstrap_script": f"{base}/bootstrap",
                     "server_py": f"{base}/bootstrap/server.py",
                     "server_py_sha256": state.server_py_sha256 or None, "files": files,
                     "third_party": "dependencies come from the package index (PIP_INDEX_URL applies)"},
        "primitives": PRIMITIVES,
        "bootstrap_steps": [
            f"Run `curl -fsSL {base}/bootstrap | sh` (or fetch {base}/bootstrap/server.py and run it with "
            "python3) on the new machine; read it first: it is handed out on trust-on-first-use.",
            "It creates a virtualenv under ~/.darkmatter (DARKMATTER_HOME), downloads the packages above, checks "
            "each against its SHA-256, and installs them (third-party dependencies from the package index).",
            "It picks a free port in 8100-8110 (DARKMATTER_BOOTSTRAP_PORTS), starts the node in the background "
            "(DARKMATTER_TRANSPORT=http, log under ~/.darkmatter/logs) and waits for "
            "/.well-known/darkmatter.json.",
            "It prints the .mcp.json entry (stdio, the virtualenv's python, `-m darkmatter run`) for the new "
            "agent's MCP client.",
            f"The new agent connects back with darkmatter_request_connection url={base}.",
            "Re-running it is safe: it reuses the virtualenv and does not start a second node.",
        ],
        "compatibility": f"Protocol {PROTOCOL_VERSION}; interoperates with protocol 0.2 nodes (docs/protocol.md §1.3): "
                         "0.3 only adds fields and endpoints, refusing 0.2 behaviour only where it would allow "
                         "spoofing, replay or hijack.",
        "protocol_version": PROTOCOL_VERSION,
    }


async def _template_handler(node, args: dict, session) -> dict:
    result = template(node)
    # the original implementation's keys (protocol 0.2), beside the new ones
    source = for_node(node).server_py
    result.update(template_from=node.agent_id, server_source=source.decode() if source else None,
                  bootstrap_instructions={str(i): step for i, step in enumerate(result["bootstrap_steps"], 1)},
                  core_primitives=[p["tool"] for p in PRIMITIVES], compatibility_note=result["compatibility"])
    return result


def server_template_tool() -> Tool:
    return Tool("darkmatter_get_server_template",
                "The server template for starting a new DarkMatter node: installed kernel and plugin versions, "
                "where to get the packages (/bootstrap...), the core primitives, the bootstrap steps and a "
                "compatibility note. A recommendation the new node may change.",
                _template_handler, read_only=True, idempotent=True, title="Server template")
