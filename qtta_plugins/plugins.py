"""The plugin manager: built-in plugins registered by the core, others found through entry points.

Built-in methods are registered here exactly as a third party's plugin would be; backend adapters
(including our own torchao / Brevitas / NNCF ones) arrive through the ``qtta_plugins`` entry-point
group, so a package that declares

.. code-block:: toml

    [project.entry-points.qtta_plugins]
    mymethod = "my_package.qtta_plugin"

adds a method or a backend with nothing else. Set ``QTTA_PLUGINS_NO_ENTRYPOINTS=1`` to load only the
built-in plugins (useful to isolate a faulty third-party plugin).
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .methods import BUILTIN_METHOD_PLUGINS

_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None


def _build() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_METHOD_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if not os.environ.get("QTTA_PLUGINS_NO_ENTRYPOINTS"):
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    global _pm
    with _lock:
        if _pm is None:
            _pm = _build()
        return _pm


def reload_plugins() -> pluggy.PluginManager:
    """Rebuild the plugin manager (after installing a plugin in the same process, say)."""
    global _pm
    with _lock:
        _pm = None
    return plugin_manager()


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str  # "qtta-plugins (built-in)" or "<dist> <version>"
    hooks: tuple[str, ...]
    methods: tuple[str, ...]
    backends: tuple[str, ...]


def list_plugins() -> list[PluginInfo]:
    """Every registered plugin, the distribution it comes from, and what it provides."""
    pm = plugin_manager()
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    infos = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(id(plugin))
        origin = (
            f"{dist.project_name} {dist.version}" if dist is not None else "qtta-plugins (built-in)"
        )
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or []))
        methods = tuple(m.name for m in getattr(plugin, "qtta_methods", lambda: [])())
        backends = tuple(getattr(plugin, "qtta_backends", lambda: [])())
        infos.append(PluginInfo(name, origin, hooks, methods, backends))
    return infos


def available_methods(hook: str | None = None) -> dict[str, object]:
    """Method name -> :class:`~qtta_plugins.methods.base.MethodInfo`, optionally for one hook."""
    found = {}
    for infos in plugin_manager().hook.qtta_methods():
        for info in infos:
            if hook is None or info.hook == hook:
                found.setdefault(info.name, info)
    return found


def available_backends() -> list[str]:
    return sorted({b for names in plugin_manager().hook.qtta_backends() for b in names})
