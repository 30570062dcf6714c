"""The programs ``/bootstrap`` hands to a new machine, rendered from the files in ``templates/``.

``bootstrap.sh`` is a POSIX shell script; ``server.py.tmpl`` a stdlib-only Python launcher. Both embed
``helper.py`` (the shell script adds ``helper_cli.py``, the launcher ``launcher.py``). A template marks
each value with ``@@NAME@@``; :func:`fill` replaces every marker in one pass, so an inserted value is
never scanned for markers again, and every value taken from outside is quoted for its language first:
:func:`shq` single-quotes a shell word (control characters refused), ``json.dumps`` makes a Python
literal. The files are package data, read once at import through ``importlib.resources``.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from typing import Iterable, Protocol

from darkmatter.api import __version__

MARKER = re.compile(r"@@[A-Z_]+@@")
HEREDOC_END = "DM_HELPER_EOF"  # the shell script's quoted here-document around the Python helper
FILES = ("bootstrap.sh", "server.py.tmpl", "helper.py", "helper_cli.py", "launcher.py",
         "pending.sh", "unavailable.sh", "pending.py", "unavailable.py")


def _load() -> dict[str, str]:
    folder = resources.files(__package__) / "templates"
    texts = {name: (folder / name).read_text(encoding="utf-8") for name in FILES}
    # NOTE: the Python helper travels inside the shell script's quoted here-document: it must not end it.
    if any(HEREDOC_END in texts[name] for name in ("helper.py", "helper_cli.py")):
        raise ValueError(f"templates/helper*.py contain {HEREDOC_END}, which would end the here-document")
    return texts


TEMPLATES = _load()


class Listed(Protocol):
    """What a rendered program needs to know of one package: its file name and SHA-256."""

    file: str
    sha256: str


def shq(value: str) -> str:
    """One single-quoted shell word holding exactly ``value``."""
    if not isinstance(value, str) or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("refusing to embed a value with control characters in a shell script")
    return "'" + value.replace("'", "'\"'\"'") + "'"


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every ``@@MARKER@@`` in one pass. The template's markers and ``values`` must be the same
    set: a marker left unfilled or a value with no place is a bug in the template, not in the request."""
    markers = set(MARKER.findall(template))
    if markers != set(values):
        raise ValueError(f"template markers {sorted(markers)} do not match the values {sorted(values)}")
    return MARKER.sub(lambda m: values[m.group(0)], template)


def package_set(packages: Iterable[Listed]) -> str:
    """One hash naming the exact set of packages (the scripts skip pip when it is unchanged)."""
    return hashlib.sha256("".join(f"{p.file} {p.sha256}\n" for p in packages).encode()).hexdigest()


def render_script(origin: str, packages: list[Listed]) -> str:
    """The ``/bootstrap`` shell script fetching ``packages`` from ``origin``."""
    fetch = "\n".join(f'    dm_fetch {shq(p.file)} {shq(p.sha256)}\n    set -- "$@" "$DM_PKG_DIR"/{shq(p.file)}'
                      for p in packages)
    helper = TEMPLATES["helper.py"].rstrip("\n") + "\n\n\n" + TEMPLATES["helper_cli.py"].rstrip("\n")
    values = {"@@ORIGIN@@": shq(origin.rstrip("/")), "@@KERNEL_VERSION@@": shq(__version__),
              "@@PACKAGE_SET@@": shq(package_set(packages)), "@@FETCH@@": fetch, "@@HELPER@@": helper}
    return fill(TEMPLATES["bootstrap.sh"], values)


def render_server_py(origin: str, packages: list[Listed]) -> str:
    """``/bootstrap/server.py``: the same steps as the shell script, in stdlib-only Python."""
    values = {"@@ORIGIN@@": json.dumps(origin.rstrip("/")), "@@KERNEL_VERSION@@": json.dumps(__version__),
              "@@PACKAGE_SET@@": json.dumps(package_set(packages)),
              "@@PACKAGES@@": json.dumps([[p.file, p.sha256] for p in packages]),
              "@@HELPER@@": TEMPLATES["helper.py"].rstrip("\n"), "@@LAUNCHER@@": TEMPLATES["launcher.py"].rstrip("\n")}
    return fill(TEMPLATES["server.py.tmpl"], values)
