"""Self-replication (PROTOCOL.md §4.11): ``/bootstrap``, ``/bootstrap/server.py``,
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
                "(PROTOCOL.md §4.2, §4.3)."},
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
        "compatibility": f"Protocol {PROTOCOL_VERSION}; interoperates with protocol 0.2 nodes (PROTOCOL.md §1.3): "
                         "0.3 only adds fields and endpoints, refusing 0.2 behaviour only where it would allow "
                         "spoofing, replay or hijack.",
        "protocol_version": PROTOCOL_VERSION,
    }


async def _template_handler(node, args: dict, session) -> dict:
    return template(node)


def server_template_tool() -> Tool:
    return Tool("darkmatter_get_server_template",
                "The server template for starting a new DarkMatter node: installed kernel and plugin versions, "
                "where to get the packages (/bootstrap...), the core primitives, the bootstrap steps and a "
                "compatibility note. A recommendation the new node may change.",
                _template_handler, read_only=True, idempotent=True, title="Server template")


# --- the script and the launcher ----------------------------------------------------------------
# NOTE: everything below is code handed to other machines. The shell template is POSIX sh; the Python
# parts are stdlib-only and run on Python 3.8+ (they check for 3.11+ before creating the virtualenv).

SHELL_TEMPLATE = r"""#!/bin/sh
# DarkMatter bootstrap (PROTOCOL.md section 4.11), generated by a DarkMatter node.
#
#   curl -fsSL <node>/bootstrap | sh
#
# Installs the DarkMatter kernel and the plugins the serving node runs into a virtualenv under
# $DARKMATTER_HOME (default ~/.darkmatter), starts a node on a free port in $DARKMATTER_BOOTSTRAP_PORTS
# (default 8100-8110), waits for its well-known document and prints the .mcp.json to use.
# The packages come from the serving node and are checked against the SHA-256 sums below; third-party
# dependencies come from the package index (PIP_INDEX_URL and pip's other settings apply).
# Re-running it is safe: it reuses the virtualenv and never starts a second node while its own runs.
# Other settings: DARKMATTER_BOOTSTRAP_WAIT (seconds, default 90), DARKMATTER_PYTHON (a Python 3.11+).
# Code handed out on trust-on-first-use: read it before you run it.
set -eu

DM_ORIGIN=@@ORIGIN@@
DM_KERNEL_VERSION=@@KERNEL_VERSION@@
DM_PACKAGE_SET=@@PACKAGE_SET@@

say() { printf '%s\n' "darkmatter-bootstrap: $*" >&2; }
die() { say "error: $*"; exit 1; }
dm_read() { dm_val=; if [ -r "$1" ]; then IFS= read -r dm_val < "$1" || true; fi; }
dm_python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' </dev/null >/dev/null 2>&1
}

dm_helper() {
    "$DM_PY" - "$@" <<'DM_HELPER_EOF'
@@HELPER@@
DM_HELPER_EOF
}

dm_settings() {
    : "${HOME:?HOME is not set}"
    DM_HOME=${DARKMATTER_HOME:-$HOME/.darkmatter}
    case $DM_HOME in /*) ;; *) DM_HOME=$(pwd)/$DM_HOME ;; esac
    DM_PORTS=${DARKMATTER_BOOTSTRAP_PORTS:-8100-8110}
    case $DM_PORTS in *[!0-9,-]*|'')
        die "DARKMATTER_BOOTSTRAP_PORTS=$DM_PORTS: give ports and lo-hi ranges separated by commas (8100-8110)" ;;
    esac
    DM_WAIT=${DARKMATTER_BOOTSTRAP_WAIT:-90}
    case $DM_WAIT in *[!0-9]*|'') die "DARKMATTER_BOOTSTRAP_WAIT=$DM_WAIT is not a whole number of seconds" ;; esac
    DM_VENV=$DM_HOME/venv
    DM_VPY=$DM_VENV/bin/python
    DM_DIR=$DM_HOME/bootstrap
    DM_PKG_DIR=$DM_DIR/packages
}

dm_find_python() {
    if [ -n "${DARKMATTER_PYTHON:-}" ]; then
        dm_python_ok "$DARKMATTER_PYTHON" \
            || die "DARKMATTER_PYTHON=$DARKMATTER_PYTHON is not a working Python 3.11 or newer"
        DM_PY=$DARKMATTER_PYTHON
        return 0
    fi
    for dm_cand in python3 python3.14 python3.13 python3.12 python3.11 python; do
        if command -v "$dm_cand" >/dev/null 2>&1 && dm_python_ok "$dm_cand"; then
            DM_PY=$(command -v "$dm_cand")
            return 0
        fi
    done
    die "DarkMatter needs Python 3.11 or newer: install it (or set DARKMATTER_PYTHON to one) and run this again"
}

dm_lock() {
    DM_LOCK=$DM_DIR/lock
    if ! mkdir "$DM_LOCK" 2>/dev/null; then
        dm_read "$DM_LOCK/pid"
        case $dm_val in ''|*[!0-9]*) ;; *) if kill -0 "$dm_val" 2>/dev/null; then
            die "another bootstrap (pid $dm_val) holds $DM_LOCK; let it finish (or remove that directory)"; fi ;; esac
        rm -rf "$DM_LOCK"
        mkdir "$DM_LOCK" || die "cannot create $DM_LOCK"
    fi
    trap 'rm -rf "$DM_LOCK"' EXIT
    trap 'exit 130' INT TERM
    printf '%s\n' "$$" > "$DM_LOCK/pid"
}

dm_fetch() {
    dm_dest=$DM_PKG_DIR/$1
    if [ -f "$dm_dest" ] && [ "$(dm_helper sha256 "$dm_dest")" = "$2" ]; then
        return 0
    fi
    say "downloading $1"
    rm -f "$dm_dest.part"
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --proto '=http,https' -o "$dm_dest.part" "$DM_ORIGIN/bootstrap/packages/$1" </dev/null \
            || die "could not download $DM_ORIGIN/bootstrap/packages/$1"
    else
        dm_helper fetch "$DM_ORIGIN/bootstrap/packages/$1" "$dm_dest.part" \
            || die "could not download $DM_ORIGIN/bootstrap/packages/$1"
    fi
    dm_got=$(dm_helper sha256 "$dm_dest.part") || die "cannot hash $dm_dest.part"
    if [ "$dm_got" != "$2" ]; then
        rm -f "$dm_dest.part"
        die "$1 does not match its SHA-256 (expected $2, got $dm_got); nothing was installed from it"
    fi
    mv -f "$dm_dest.part" "$dm_dest"
}

dm_venv() {
    DM_NEW_VENV=0
    if [ -x "$DM_VPY" ] && dm_python_ok "$DM_VPY" && "$DM_VPY" -m pip --version </dev/null >/dev/null 2>&1; then
        say "reusing the virtualenv $DM_VENV"
        return 0
    fi
    say "creating the virtualenv $DM_VENV with $DM_PY"
    "$DM_PY" -m venv --clear "$DM_VENV" </dev/null >&2 \
        || die "could not create a virtualenv (on Debian or Ubuntu: apt install python3-venv)"
    DM_NEW_VENV=1
}

dm_install() {
    set --
@@FETCH@@
    dm_venv
    DM_UPDATED=0
    dm_read "$DM_DIR/installed"
    if [ "$dm_val" = "$DM_PACKAGE_SET" ] && "$DM_VPY" -c 'import darkmatter' </dev/null >/dev/null 2>&1; then
        say "the packages are installed already"
        return 0
    fi
    say "installing DarkMatter $DM_KERNEL_VERSION (third-party dependencies come from the package index)"
    "$DM_VPY" -m pip install --disable-pip-version-check --progress-bar off "$@" </dev/null >&2 \
        || die "pip could not install the packages (see above; PIP_INDEX_URL selects another package index)"
    if [ "$DM_NEW_VENV" = 0 ]; then
        "$DM_VPY" -m pip install --disable-pip-version-check --progress-bar off --no-deps --force-reinstall "$@" \
            </dev/null >&2 || die "pip could not reinstall the packages"
    fi
    printf '%s\n' "$DM_PACKAGE_SET" > "$DM_DIR/installed"
    DM_UPDATED=1
}

dm_running() {
    dm_read "$DM_DIR/node.port"; DM_PORT=$dm_val
    case $DM_PORT in ''|*[!0-9]*) return 1 ;; esac
    dm_read "$DM_DIR/node.pid"; DM_PID=$dm_val
    dm_read "$DM_DIR/node.agent"; dm_agent=$dm_val
    DM_AGENT=$(dm_helper probe "$DM_PORT") || return 1
    if [ -n "$dm_agent" ]; then
        [ "$DM_AGENT" = "$dm_agent" ] || return 1
    else
        case $DM_PID in ''|*[!0-9]*) return 1 ;; esac
        dm_helper alive "$DM_PID" || return 1
    fi
}

dm_start() {
    dm_read "$DM_DIR/node.port"
    DM_PORT=$(dm_helper pick-port "$DM_PORTS" "$dm_val") \
        || die "no free port in $DM_PORTS (set DARKMATTER_BOOTSTRAP_PORTS)"
    DM_LOG=$DM_HOME/logs/node-$DM_PORT.log
    DM_PID=$(dm_helper launch "$DM_VPY" "$DM_PORT" "$DM_HOME/state/$DM_PORT.json" "$DM_LOG" "$DM_HOME") \
        || die "could not start the node"
    printf '%s\n' "$DM_PID" > "$DM_DIR/node.pid"
    printf '%s\n' "$DM_PORT" > "$DM_DIR/node.port"
    rm -f "$DM_DIR/node.agent"
    say "started the node (pid $DM_PID, port $DM_PORT); waiting up to $DM_WAIT s for it to answer"
    if ! DM_AGENT=$(dm_helper wait "$DM_PORT" "$DM_PID" "$DM_WAIT"); then
        say "the node did not answer; the end of $DM_LOG:"
        dm_helper tail "$DM_LOG" || true
        die "the node did not start (pid $DM_PID)"
    fi
    printf '%s\n' "$DM_AGENT" > "$DM_DIR/node.agent"
}

dm_main() {
    dm_settings
    dm_find_python
    mkdir -p "$DM_PKG_DIR" "$DM_HOME/logs" && (umask 077 && mkdir -p "$DM_HOME/state") \
        || die "cannot create directories under $DM_HOME"
    dm_lock
    say "installing from $DM_ORIGIN into $DM_HOME"
    dm_install
    if dm_running; then
        say "the node started by an earlier run is still running (pid $DM_PID, port $DM_PORT)"
        if [ "$DM_UPDATED" = 1 ]; then
            say "new packages were installed: stop it (kill $DM_PID) and run this again to use them"
        fi
    else
        dm_start
    fi
    dm_helper report "$DM_ORIGIN" "$DM_VPY" "$DM_PORT" "$DM_PID" "$DM_AGENT" "$DM_HOME"
}

dm_main "$@"
"""

PY_COMMON = r'''
import hashlib, json, os, socket, subprocess, sys, time, urllib.request


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(65536), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url, dest):
    with urllib.request.urlopen(url, timeout=300) as reply, open(dest, "wb") as out:
        for chunk in iter(lambda: reply.read(65536), b""):
            out.write(chunk)


def parse_ports(spec):
    ports = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            lo, hi = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError("%r is not a port or a lo-hi range of ports" % part)
        if not 1 <= lo <= hi <= 65535:
            raise ValueError("%r is not within 1-65535" % part)
        ports.extend(p for p in range(lo, hi + 1) if p not in ports)
    if not ports or len(ports) > 1024:
        raise ValueError("%r must list between 1 and 1024 ports" % spec)
    return ports


def pick_port(spec, prefer=""):
    ports = parse_ports(spec)
    if prefer.isdigit() and int(prefer) in ports:
        ports.remove(int(prefer))
        ports.insert(0, int(prefer))
    for port in ports:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            sock.close()
    return None


def probe(port, timeout=2.0):
    """The agent_id of the DarkMatter node answering on 127.0.0.1:port, else None (never via a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open("http://127.0.0.1:%d/.well-known/darkmatter.json" % int(port), timeout=timeout) as r:
            doc = json.loads(r.read(65536).decode("utf-8"))
    except Exception:
        return None
    if isinstance(doc, dict) and doc.get("darkmatter") is True and isinstance(doc.get("agent_id"), str):
        return doc["agent_id"]
    return None


def alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return False
    try:
        with open("/proc/%d/stat" % int(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def launch(vpy, port, state_file, log_path, cwd):
    """Start `python -m darkmatter run` in its own session (setsid), detached from this terminal."""
    env = dict(os.environ, DARKMATTER_TRANSPORT="http", DARKMATTER_PORT=str(port), DARKMATTER_STATE_FILE=state_file)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([vpy, "-m", "darkmatter", "run"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, cwd=cwd, env=env, start_new_session=True, close_fds=True)
    return proc.pid


def wait_for(port, pid, timeout):
    deadline = time.monotonic() + float(timeout)
    while True:
        agent = probe(port)
        if agent:
            return agent
        if not alive(pid) or time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def tail(path, lines=30):
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read()[-65536:].splitlines()[-lines:]).decode("utf-8", "replace") + "\n"
    except OSError:
        return "(no log)\n"


def report(origin, vpy, port, pid, agent, home):
    state = os.path.join(home, "state", "%s.json" % port)
    config = {"mcpServers": {"darkmatter": {"command": vpy, "args": ["-m", "darkmatter", "run"],
                                            "env": {"DARKMATTER_PORT": str(port), "DARKMATTER_STATE_FILE": state}}}}
    text = json.dumps(config, indent=2)
    path = os.path.join(home, "mcp.json")
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)
    return "\n".join([
        "DarkMatter node running at http://127.0.0.1:%s (pid %s, agent %s)" % (port, pid, agent),
        "Log: %s" % os.path.join(home, "logs", "node-%s.log" % port),
        "",
        "Add this to your .mcp.json (also saved as %s):" % path,
        text,
        "",
        "To connect back to the node this came from, have your agent call the darkmatter_request_connection",
        "tool with url: %s" % origin,
        "Stop the node with: kill %s (run this again to restart it)." % pid,
    ])
'''

PY_CLI = r'''

def _cli(cmd, args):
    if cmd == "sha256":
        print(sha256_file(args[0]))
    elif cmd == "fetch":
        fetch(args[0], args[1])
    elif cmd == "pick-port":
        try:
            port = pick_port(args[0], args[1])
        except ValueError as exc:
            sys.stderr.write("darkmatter-bootstrap: DARKMATTER_BOOTSTRAP_PORTS: %s\n" % exc)
            return 2
        if port is None:
            return 1
        print(port)
    elif cmd == "probe":
        agent = probe(args[0])
        if not agent:
            return 1
        print(agent)
    elif cmd == "alive":
        return 0 if alive(args[0]) else 1
    elif cmd == "launch":
        print(launch(*args))
    elif cmd == "wait":
        agent = wait_for(*args)
        if not agent:
            return 1
        print(agent)
    elif cmd == "tail":
        sys.stderr.write(tail(args[0]))
    elif cmd == "report":
        print(report(*args))
    else:
        return 2
    return 0


sys.exit(_cli(sys.argv[1], sys.argv[2:]))'''

SERVER_HEAD = '''#!/usr/bin/env python3
"""DarkMatter bootstrap launcher (PROTOCOL.md section 4.11), generated by a DarkMatter node. Stdlib only.

    python3 server.py [--origin URL]

Does what the node's /bootstrap shell script does: installs the DarkMatter kernel and the plugins the
serving node runs into a virtualenv under $DARKMATTER_HOME (default ~/.darkmatter), checking every
package against the SHA-256 below; starts a node on a free port in $DARKMATTER_BOOTSTRAP_PORTS (default
8100-8110); waits for its well-known document and prints the .mcp.json to use. Safe to re-run.
Settings: DARKMATTER_HOME, DARKMATTER_BOOTSTRAP_PORTS, DARKMATTER_BOOTSTRAP_WAIT, DARKMATTER_PYTHON,
PIP_INDEX_URL (pip's settings apply). --origin fetches the packages from another URL of the same node.
"""

ORIGIN = @@ORIGIN@@
KERNEL_VERSION = @@KERNEL_VERSION@@
PACKAGE_SET = @@PACKAGE_SET@@
PACKAGES = @@PACKAGES@@
'''

PY_MAIN = r'''
import argparse, re, shutil


class Failure(Exception):
    pass


def say(text):
    sys.stderr.write("darkmatter-bootstrap: %s\n" % text)


def read_line(path):
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def write_line(path, value):
    with open(path, "w") as f:
        f.write("%s\n" % value)


def python_ok(path):
    try:
        return subprocess.run([path, "-c", "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def find_python():
    wanted = os.environ.get("DARKMATTER_PYTHON")
    if wanted:
        if python_ok(wanted):
            return wanted
        raise Failure("DARKMATTER_PYTHON=%s is not a working Python 3.11 or newer" % wanted)
    if sys.version_info >= (3, 11):
        return sys.executable
    for name in ("python3", "python3.14", "python3.13", "python3.12", "python3.11"):
        path = shutil.which(name)
        if path and python_ok(path):
            return path
    raise Failure("DarkMatter needs Python 3.11 or newer: install it (or set DARKMATTER_PYTHON) and run this again")


def take_lock(directory):
    lock = os.path.join(directory, "lock")
    try:
        os.mkdir(lock)
    except FileExistsError:
        other = read_line(os.path.join(lock, "pid"))
        if other.isdigit() and alive(other):
            raise Failure("another bootstrap (pid %s) holds %s; let it finish (or remove that directory)"
                          % (other, lock))
        shutil.rmtree(lock, ignore_errors=True)
        os.mkdir(lock)
    write_line(os.path.join(lock, "pid"), os.getpid())
    return lock


def run(cmd, what):
    if subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr).returncode != 0:
        raise Failure(what)


def install(origin, home, python):
    venv, directory = os.path.join(home, "venv"), os.path.join(home, "bootstrap")
    vpy = os.path.join(venv, "bin", "python")
    files = []
    for name, sha in PACKAGES:
        dest = os.path.join(directory, "packages", name)
        if not (os.path.isfile(dest) and sha256_file(dest) == sha):
            say("downloading %s" % name)
            try:
                fetch("%s/bootstrap/packages/%s" % (origin, name), dest + ".part")
            except OSError as exc:
                raise Failure("could not download %s from %s: %s" % (name, origin, exc))
            got = sha256_file(dest + ".part")
            if got != sha:
                os.remove(dest + ".part")
                raise Failure("%s does not match its SHA-256 (expected %s, got %s); nothing was installed from it"
                              % (name, sha, got))
            os.replace(dest + ".part", dest)
        files.append(dest)
    fresh = not (os.access(vpy, os.X_OK) and python_ok(vpy) and subprocess.run(
        [vpy, "-m", "pip", "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL).returncode == 0)
    if fresh:
        say("creating the virtualenv %s with %s" % (venv, python))
        run([python, "-m", "venv", "--clear", venv],
            "could not create a virtualenv (on Debian or Ubuntu: apt install python3-venv)")
    else:
        say("reusing the virtualenv %s" % venv)
    stamp = os.path.join(directory, "installed")
    if read_line(stamp) == PACKAGE_SET and subprocess.run(
            [vpy, "-c", "import darkmatter"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
        say("the packages are installed already")
        return vpy, False
    say("installing DarkMatter %s (third-party dependencies come from the package index)" % KERNEL_VERSION)
    pip = [vpy, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    run(pip + files, "pip could not install the packages (see above; PIP_INDEX_URL selects another index)")
    if not fresh:
        run(pip + ["--no-deps", "--force-reinstall"] + files, "pip could not reinstall the packages")
    write_line(stamp, PACKAGE_SET)
    return vpy, True


def running(directory):
    port, pid, agent = (read_line(os.path.join(directory, n)) for n in ("node.port", "node.pid", "node.agent"))
    if not port.isdigit():
        return None
    seen = probe(port)
    if not seen or (agent and seen != agent) or (not agent and not (pid.isdigit() and alive(pid))):
        return None
    return port, pid, seen


def start(home, directory, vpy, ports, wait):
    port = pick_port(ports, read_line(os.path.join(directory, "node.port")))
    if port is None:
        raise Failure("no free port in %s (set DARKMATTER_BOOTSTRAP_PORTS)" % ports)
    log_path = os.path.join(home, "logs", "node-%s.log" % port)
    pid = launch(vpy, port, os.path.join(home, "state", "%s.json" % port), log_path, home)
    write_line(os.path.join(directory, "node.pid"), pid)
    write_line(os.path.join(directory, "node.port"), port)
    if os.path.exists(os.path.join(directory, "node.agent")):
        os.remove(os.path.join(directory, "node.agent"))
    say("started the node (pid %s, port %s); waiting up to %s s for it to answer" % (pid, port, wait))
    agent = wait_for(port, pid, wait)
    if not agent:
        sys.stderr.write(tail(log_path))
        raise Failure("the node did not start (pid %s); its log is %s" % (pid, log_path))
    write_line(os.path.join(directory, "node.agent"), agent)
    return port, pid, agent


def main(argv=None):
    parser = argparse.ArgumentParser(description="Install and start a DarkMatter node.")
    parser.add_argument("--origin", default=ORIGIN, help="base URL of the node to fetch the packages from")
    args = parser.parse_args(argv)
    origin = args.origin.rstrip("/")
    try:
        if not re.match(r"^https?://[^\s/]+(/\S*)?$", origin):
            raise Failure("--origin must be an http(s) URL")
        home = os.environ.get("DARKMATTER_HOME") or os.path.join(os.path.expanduser("~"), ".darkmatter")
        home = os.path.abspath(home)
        ports = os.environ.get("DARKMATTER_BOOTSTRAP_PORTS") or "8100-8110"
        try:
            parse_ports(ports)
            wait = int(os.environ.get("DARKMATTER_BOOTSTRAP_WAIT") or "90")
        except ValueError as exc:
            raise Failure("bad setting: %s" % exc)
        python = find_python()
        directory = os.path.join(home, "bootstrap")
        for sub in (os.path.join(directory, "packages"), os.path.join(home, "logs")):
            os.makedirs(sub, exist_ok=True)
        os.makedirs(os.path.join(home, "state"), mode=0o700, exist_ok=True)
        lock = take_lock(directory)
        try:
            say("installing from %s into %s" % (origin, home))
            vpy, updated = install(origin, home, python)
            found = running(directory)
            if found:
                say("the node started by an earlier run is still running (pid %s, port %s)" % (found[1], found[0]))
                if updated:
                    say("new packages were installed: stop it (kill %s) and run this again to use them" % found[1])
            else:
                found = start(home, directory, vpy, ports, wait)
        finally:
            shutil.rmtree(lock, ignore_errors=True)
    except Failure as exc:
        say("error: %s" % exc)
        return 1
    port, pid, agent = found
    print(report(origin, vpy, port, pid, agent, home))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''
