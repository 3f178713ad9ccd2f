"""Plugin discovery (entry-point group ``radio_core``) and lookup of components by name."""
from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Optional

import pluggy

from . import hookspecs
from .protocols import KINDS
from .utils import closest

ENTRY_POINT_GROUP = "radio_core"


class PluginError(LookupError):
    """An unknown component name, or a plugin that failed to load or broke its contract."""


@dataclass
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str  # entry-point name
    distribution: str  # distribution that ships it ("<local>" when registered by hand)
    doc: str = ""


@dataclass
class LoadFailure:
    entry_point: str
    distribution: str
    error: str
    traceback: str = field(repr=False, default="")


class Registry:
    """Holds factories by (kind, name). Filled by the ``radio_register`` hook."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        self.failures: list[LoadFailure] = []
        self._current: tuple[str, str] = ("<local>", "<local>")
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)

    # -- registration -------------------------------------------------------------------
    def add(self, kind: str, name: str, factory: Callable[..., Any], doc: str | None = None) -> None:
        if kind not in self._components:
            raise PluginError(f"plugin {self._current[0]!r}: unknown component kind {kind!r}; "
                              f"kinds are {', '.join(KINDS)}")
        if not callable(factory):
            raise PluginError(f"plugin {self._current[0]!r}: factory for {kind} {name!r} is not callable")
        existing = self._components[kind].get(name)
        if existing is not None and existing.factory is not factory:
            raise PluginError(
                f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} "
                f"({existing.distribution}) and by plugin {self._current[0]!r} ({self._current[1]})")
        first_line = (doc or inspect.getdoc(factory) or "").strip().splitlines()
        self._components[kind][name] = Component(
            kind, name, factory, plugin=self._current[0], distribution=self._current[1],
            doc=first_line[0] if first_line else "")

    def register_plugin(self, plugin: Any, name: str, distribution: str = "<local>") -> None:
        """Register a plugin object (module) by hand, e.g. in tests or notebooks."""
        self.plugin_manager.register(plugin, name=name)
        self._current = (name, distribution)
        try:
            impl = getattr(plugin, "radio_register", None)
            if impl is not None:
                impl(registry=self)
        finally:
            self._current = ("<local>", "<local>")

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import every entry point of ``group``; a failing one is recorded, not fatal."""
        seen: set[str] = set()
        for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
            if ep.name in seen:  # same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            try:
                plugin = ep.load()
                self.register_plugin(plugin, name=ep.name, distribution=dist)
            except Exception as exc:  # noqa: BLE001 - report any failure by name, keep the rest
                self.failures.append(LoadFailure(ep.name, dist, f"{type(exc).__name__}: {exc}",
                                                 traceback.format_exc()))

    # -- lookup ---------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def components(self, kind: Optional[str] = None) -> list[Component]:
        kinds = [kind] if kind else list(KINDS)
        return [self._components[k][n] for k in kinds for n in sorted(self._components[k])]

    def get(self, kind: str, name: str) -> Component:
        if kind not in self._components:
            raise PluginError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        try:
            return self._components[kind][name]
        except KeyError:
            raise PluginError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        available = self.names(kind)
        plural = "losses" if kind == "loss" else kind + "s"
        msg = f"unknown {kind} {name!r}. Available {plural}: {', '.join(available) or '(none)'}"
        guess = closest(name, available)
        if guess:
            msg += f". Did you mean {guess!r}?"
        for f in self.failures:
            msg += (f"\n  note: plugin {f.entry_point!r} from distribution {f.distribution!r} "
                    f"failed to import ({f.error}); it may provide {name!r}")
        if not any(self._components.values()):
            msg += ("\n  note: no plugins are registered at all; is radio-distill installed "
                    "(pip install -e .) in this environment?")
        return msg

    def build(self, kind: str, name: str, **kwargs: Any) -> Any:
        comp = self.get(kind, name)
        try:
            return comp.factory(**kwargs)
        except TypeError as exc:
            # Most often a recipe `args` key the factory does not accept.
            raise PluginError(f"{kind} {name!r} (plugin {comp.plugin!r}, {comp.distribution}) "
                              f"could not be built with args {sorted(kwargs)}: {exc}") from exc

    @property
    def hook(self):
        return self.plugin_manager.hook


_DEFAULT: Optional[Registry] = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, discovered from installed entry points on first use."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        reg = Registry()
        reg.load_entry_points()
        _DEFAULT = reg
    return _DEFAULT

