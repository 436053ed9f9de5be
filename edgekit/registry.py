"""Registries of plug-ins keyed by name: compression passes, exporters and runtimes.

Built-ins are declared as entry points in pyproject.toml exactly like a third-party plug-in would
declare them (groups ``edgekit.passes``, ``edgekit.exporters``, ``edgekit.runtimes``), so the core
has no special cases. Entry points are loaded only when asked for by name, which keeps
``edgekit --help`` and ``import edgekit`` free of heavy imports such as torch.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from edgekit.errors import UnknownPluginError


class Registry:
    """Name -> plug-in class, filled from an entry-point group and from :meth:`register`."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._loaded: dict[str, Any] = {}

    def _entry_points(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def register(self, name: str, obj: Any = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def _add(o: Any) -> Any:
            self._loaded[name] = o
            return o

        return _add if obj is None else _add(obj)

    def names(self) -> list[str]:
        return sorted(set(self._loaded) | set(self._entry_points()))

    def get(self, name: str) -> Any:
        if name in self._loaded:
            return self._loaded[name]
        eps = self._entry_points()
        if name not in eps:
            known = ", ".join(self.names()) or "none (is edgekit installed? run `make setup`)"
            raise UnknownPluginError(f"no {self.kind} named '{name}'", f"known: {known}")
        self._loaded[name] = eps[name].load()
        return self._loaded[name]


PASSES = Registry("compression pass", "edgekit.passes")
EXPORTERS = Registry("exporter", "edgekit.exporters")
RUNTIMES = Registry("runtime", "edgekit.runtimes")
