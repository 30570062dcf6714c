"""The plugin manager: one per node, built by a factory, never at import time.

Selection rules (as llm's): ``DARKMATTER_PLUGINS`` / ``--plugins`` unset = every installed plugin,
``""`` = none besides the essential built-ins, ``"a,b"`` = exactly those. ``--disable x`` drops one.
An unknown name fails with the list of installed plugins. A requested plugin that fails to import is an
error; an autoloaded one is logged and skipped.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Iterable

import pluggy

from darkmatter import hookspecs

log = logging.getLogger(__name__)

GROUP = "darkmatter"

# Essential built-ins: always registered, cannot be disabled.
BUILTINS = (
    "darkmatter.builtin.policy",
    "darkmatter.builtin.json_storage",
    "darkmatter.builtin.core_tools",
    "darkmatter.builtin.identity_tools",
)


class PluginError(Exception):
    """Plugin selection or loading failed; the message says what to do."""


@dataclass
class PluginInfo:
    name: str
    module: str
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    dist: Any = field(default=None, repr=False, compare=False)  # the installed distribution, if any
    known_version: str | None = None

    @property
    def version(self) -> str | None:
        """The plugin's version; a distribution's is read from its metadata when first asked, not at start."""
        if self.known_version is None and self.dist is not None:
            self.known_version = self.dist.version
        return self.known_version


def installed_plugins() -> dict[str, object]:
    """Entry points of the ``darkmatter`` group, by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _parse_selection(selection: str | None) -> list[str] | None:
    if selection is None:
        return None
    return [s.strip() for s in selection.split(",") if s.strip()]


def build_plugin_manager(
    selection: str | None = None,
    disable: Iterable[str] = (),
    *,
    entrypoints: bool = True,
    extra: Iterable[object] = (),
) -> pluggy.PluginManager:
    """Build a fresh plugin manager.

    ``selection`` follows the rules above; ``extra`` are plugin objects (modules or instances) to
    register as well, e.g. from tests. The manager carries ``pm.darkmatter_info``: a list of
    :class:`PluginInfo` for ``darkmatter plugins``.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    for modname in BUILTINS:
        module = importlib.import_module(modname)
        pm.register(module, name=modname)
        infos.append(PluginInfo(modname.rsplit(".", 1)[1], modname, builtin=True))

    available = installed_plugins() if entrypoints else {}
    wanted = _parse_selection(selection)
    disabled = {d.strip() for d in disable if d and d.strip()}
    essential = {m.rsplit(".", 1)[1] for m in BUILTINS}
    for name in sorted(disabled & essential):
        raise PluginError(f"{name!r} is an essential built-in and cannot be disabled.")
    for name in sorted((set(wanted or []) | disabled) - set(available)):
        known = ", ".join(sorted(available)) or "none"
        raise PluginError(f"Unknown plugin {name!r}. Installed plugins: {known}.")
    explicit = wanted is not None
    names = wanted if explicit else sorted(available)
    for name in names:
        if name in disabled or pm.has_plugin(name):
            continue
        ep = available[name]
        try:
            module = ep.load()
            _register_checked(pm, module, name)
        except Exception as exc:  # noqa: BLE001 - plugin import errors are reported, not raised raw
            what = "has invalid hooks" if isinstance(exc, pluggy.PluginValidationError) else "failed to import"
            if explicit:
                raise PluginError(f"Plugin {name!r} {what}: {type(exc).__name__}: {exc}") from exc
            log.warning("skipping plugin %r: %s: %s: %s", name, what, type(exc).__name__, exc)
            continue
        infos.append(PluginInfo(name, getattr(module, "__name__", repr(module)), dist=getattr(ep, "dist", None)))
    for i, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or getattr(plugin, "name", None) or f"extra-{i}"
        pm.register(plugin, name=name)
        infos.append(PluginInfo(name, name, known_version=getattr(plugin, "__version__", None)))
    for info in infos:
        plugin = pm.get_plugin(info.module if info.builtin else info.name)
        info.hooks = sorted(c.name for c in pm.get_hookcallers(plugin) or [])
    pm.darkmatter_info = infos  # type: ignore[attr-defined]
    pm.check_pending()
    return pm


def _register_checked(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Register one plugin; a hook implementation without a spec unregisters it again and raises."""
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError:
        if pm.has_plugin(name):
            pm.unregister(name=name)
        raise


def plugin_name(pm: pluggy.PluginManager, plugin: object) -> str:
    name = pm.get_name(plugin) or repr(plugin)
    return name.rsplit(".", 1)[-1] if name.startswith("darkmatter.builtin.") else name


def active_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    return [i for i in pm.darkmatter_info if not i.builtin]  # type: ignore[attr-defined]

