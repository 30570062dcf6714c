"""Wheels of the kernel and of the plugins a node runs, packed from the installed distributions.

A wheel is built from the installed distribution itself: its dist-info metadata plus the files of its
import packages (for an editable install those files come from the source tree). That needs no build
backend or network, and a node installed from these wheels can pack the same wheels in turn. Wheels are
deterministic (same files, same bytes) and cached by source hash under ``<state dir>/bootstrap-cache``.
Everything here blocks: run it in a thread.
"""

from __future__ import annotations

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
import zipfile
from dataclasses import dataclass
from pathlib import Path

from darkmatter.api import PLUGIN_GROUP

log = logging.getLogger(__name__)

WHEEL_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+!-]*\.whl$")
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


def build_packages(plugins: list[str], cache: Path) -> list[Package]:
    """Wheels of the kernel and of the plugins named (entry point names in the ``darkmatter`` group), the
    kernel first. A plugin that is no installed distribution (one registered by a test) is left out.
    Raises :class:`PackagingError` naming the distribution that failed."""
    from importlib import metadata

    def installed(name: str):
        # NOTE: a source checkout on sys.path shadows the installed copy with its *.egg-info (no RECORD);
        # take the first distribution of that name that has a .dist-info.
        for dist in metadata.distributions(name=name):
            if any(p.name == "METADATA" and p.parent.name.endswith(".dist-info") for p in dist.files or ()):
                return dist
        raise PackagingError(f"{name} is not installed as a distribution with a .dist-info")

    eps = {ep.name: ep for ep in metadata.entry_points(group=PLUGIN_GROUP)}
    targets = [("kernel", None, installed("darkmatter"), ["darkmatter"])]
    for name in plugins:
        ep = eps.get(name)
        if ep is None or getattr(ep, "dist", None) is None:
            log.info("bootstrap: plugin %r is not an installed distribution; it is not offered", name)
            continue
        targets.append(("plugin", name, installed(ep.dist.name), [ep.module.split(".")[0]]))
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
