"""Plugins: a user's modules imported before a config is checked, so that what they register (a variant, a
layer kind, a cache policy, an attention backend) is there for every command (docs/plugins.md).

Two sources, both imported once per process: the `plugins` list of the config (module names, importable
through `PYTHONPATH` or as an installed package), and every entry point of the installed
distributions in the group `lrexp.plugins`. A grid's cells read their plugins from their config file, so
the cells import them too. A plugin that fails to import is a one-line error naming it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable, Sequence, Set

from lrexp.config.errors import ConfigError

ENTRY_POINT_GROUP = "lrexp.plugins"
_loaded: Set[str] = set()  # module names and entry points already imported in this process


class PluginError(ConfigError):
    """A plugin that cannot be imported, named with the first line of its error."""


def _import(what: str, load: Callable[[], object]) -> None:
    if what in _loaded:
        return
    try:
        load()
    except Exception as exc:  # anything the user's module raises on import, ImportError first among them
        first = (str(exc).splitlines() or [""])[0]
        raise PluginError(f"plugin {what} failed to import: {type(exc).__name__}: {first}") from None
    _loaded.add(what)


def load_plugins(names: Sequence[str] = ()) -> None:
    """Import the installed `lrexp.plugins` entry points, then the modules `names` (the config's `plugins`)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _import(f"'{ep.name}' (entry point {ep.value} of group {ENTRY_POINT_GROUP})", ep.load)
    for name in names:
        if not isinstance(name, str) or not name.replace(".", "").replace("_", "").isalnum():
            raise PluginError(f"'plugins' lists {name!r}: a plugin is a module name such as my_pkg.lrexp_plugin")
        _import(f"'{name}'", lambda: importlib.import_module(name))
