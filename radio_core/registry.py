"""Plugin discovery (entry-point group ``radio_core``) and lookup of components by name.

Two plugins that register the same (kind, name) do not shadow each other: both are kept, the
plain name becomes ambiguous (using it is an error that names both distributions), and a recipe
picks one explicitly with a qualified name ``DIST:NAME`` (distribution or entry-point name,
e.g. ``plugin: radio-distill:clip``). A plugin whose import or registration fails in any way,
``sys.exit`` included, is recorded in ``failures`` with nothing of it registered.
"""
from __future__ import annotations

import inspect
import re
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Optional

import pluggy

from . import hookspecs
from .protocols import KINDS
from .utils import closest, short_repr

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


def _normalise(dist: str) -> str:
    """PEP 503 name normalisation: ``Radio_Distill`` and ``radio-distill`` are one distribution."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def discover_entry_points(group: str, warnings: list[str]) -> list[tuple[Any, str, str]]:
    """(entry point, distribution name, unique plugin name) of every entry point in ``group``,
    over every distribution on ``sys.path``. ``importlib.metadata.entry_points`` keeps only the
    first distribution of a name and pluggy only the first plugin of a name: either would let
    one package hide another. Here the same entry point seen twice (one install visible through
    two paths) loads once; one distribution name installed twice with different plugins loads
    both and says so in ``warnings`` (neither copy shadows the other silently)."""
    found: list[tuple[Any, str, str]] = []
    seen: dict[tuple[str, str, str], str] = {}  # (dist, entry point, module) -> where it was found
    copies: dict[str, set[str]] = {}  # normalised dist name -> its locations
    for dist in metadata.distributions():
        eps = [ep for ep in dist.entry_points if ep.group == group]
        if not eps:
            continue
        name = (dist.metadata["Name"] if dist.metadata is not None else None) or "<unknown>"
        where = str(getattr(dist, "_path", "") or "?")
        fresh = []
        for ep in eps:
            key = (_normalise(name), ep.name, ep.value)
            if key not in seen:
                seen[key] = where
                fresh.append(ep)
        if not fresh:
            continue  # the same install seen again (e.g. an .egg-info beside its .dist-info)
        locations = copies.setdefault(_normalise(name), set())
        if locations:
            warnings.append(short_repr(
                f"distribution {name!r} is installed more than once with different plugins "
                f"({', '.join(sorted(locations))} and {where}); both are loaded and the names they share are "
                "ambiguous: uninstall one", 600, quote=False))
        locations.add(where)
        for ep in fresh:
            pm_name = f"{name}:{ep.name}"
            n = 2
            while any(p == pm_name for _, _, p in found):
                pm_name, n = f"{name}:{ep.name}#{n}", n + 1
            found.append((ep, name, pm_name))
    return sorted(found, key=lambda f: (f[0].name, f[2]))


class Registry:
    """Holds factories by (kind, name). Filled by the ``radio_register`` hook."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        #: (kind, name) registered by more than one plugin: every claimant, in load order.
        self._conflicts: dict[str, dict[str, list[Component]]] = {k: {} for k in KINDS}
        self.failures: list[LoadFailure] = []
        #: problems of the installation that load nothing less (a distribution installed twice)
        self.warnings: list[str] = []
        self._current: tuple[str, str] = ("<local>", "<local>")
        self._added: list[Component] = []  # by the plugin being registered (undone if it fails)
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)

    # -- registration -------------------------------------------------------------------
    def add(self, kind: str, name: str, factory: Callable[..., Any], doc: str | None = None) -> None:
        if kind not in self._components:
            raise PluginError(f"plugin {self._current[0]!r}: unknown component kind {kind!r}; "
                              f"kinds are {', '.join(KINDS)}")
        if not isinstance(name, str) or not name or ":" in name:
            raise PluginError(f"plugin {self._current[0]!r}: {kind} name {name!r} must be a non-empty string "
                              "without ':'")
        if not callable(factory):
            raise PluginError(f"plugin {self._current[0]!r}: factory for {kind} {name!r} is not callable")
        first_line = (doc or inspect.getdoc(factory) or "").strip().splitlines()
        comp = Component(kind, name, factory, plugin=self._current[0], distribution=self._current[1],
                         doc=first_line[0] if first_line else "")
        existing = self._components[kind].get(name)
        if existing is not None and existing.factory is factory:
            return
        self._added.append(comp)
        if existing is not None:  # a collision: neither wins; the plain name becomes ambiguous
            del self._components[kind][name]
            self._conflicts[kind][name] = [existing, comp]
        elif name in self._conflicts[kind]:
            self._conflicts[kind][name].append(comp)
        else:
            self._components[kind][name] = comp

    def _remove(self, comp: Component) -> None:
        claimants = self._conflicts[comp.kind].get(comp.name)
        if claimants is not None:
            claimants.remove(comp)
            if len(claimants) == 1:
                self._components[comp.kind][comp.name] = claimants[0]
                del self._conflicts[comp.kind][comp.name]
        elif self._components[comp.kind].get(comp.name) is comp:
            del self._components[comp.kind][comp.name]

    def register_plugin(self, plugin: Any, name: str, distribution: str = "<local>",
                        key: Optional[str] = None) -> None:
        """Register a plugin object (module) by hand, e.g. in tests or notebooks. If its
        ``radio_register`` fails, nothing of it stays registered and the error propagates.
        ``key``: its unique name in the plugin manager (default ``name``; entry points use
        ``DIST:NAME``, so two distributions' entry points of one name both register)."""
        key = key or name
        self.plugin_manager.register(plugin, name=key)
        self._current, self._added = (name, distribution), []
        try:
            impl = getattr(plugin, "radio_register", None)
            if impl is not None:
                impl(registry=self)
        except BaseException:
            for comp in reversed(self._added):
                self._remove(comp)
            self.plugin_manager.unregister(plugin, name=key)
            raise
        finally:
            self._current, self._added = ("<local>", "<local>"), []

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import every entry point of ``group`` of every installed distribution. A plugin is
        (distribution, entry-point name): a third-party entry point named like a built-in one
        (``clip``, ``core``) loads beside it, never instead of it, and any component name both
        register becomes ambiguous (see the module docstring). One that fails in any way (an
        exception, ``sys.exit``) is recorded in ``failures`` and registers nothing."""
        from . import lifecycle

        for ep, dist, key in discover_entry_points(group, self.warnings):
            try:
                with lifecycle.phase(f"importing plugin {ep.name!r}", plugin=f"{dist}:{ep.name}"):
                    plugin = ep.load()
                if self.plugin_manager.is_registered(plugin):
                    other = self.plugin_manager.get_name(plugin)
                    raise PluginError(f"its module {ep.value!r} is already registered as plugin {other!r}; a "
                                      "module cannot be two plugins")
                self.register_plugin(plugin, name=ep.name, distribution=dist, key=key)
            except (KeyboardInterrupt, lifecycle.Stopped):  # the user's stop, not the plugin's failure
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: report by name, keep the rest
                what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SystemExit) else \
                    f"SystemExit({exc.code!r}) during import or registration"
                self.failures.append(LoadFailure(ep.name, dist, short_repr(what, 300, quote=False),
                                                 traceback.format_exc()))

    @property
    def conflicts(self) -> list[tuple[str, str, list[Component]]]:
        """(kind, name, claimants) of every name registered by more than one plugin."""
        return [(k, n, list(c)) for k in KINDS for n, c in sorted(self._conflicts[k].items())]

    def conflict_message(self, kind: str, name: str) -> str:
        claimants = self._conflicts[kind][name]
        who = " and ".join(f"distribution {c.distribution!r} (entry point {c.plugin!r})" for c in claimants)
        choices = " or ".join(repr(f"{c.distribution}:{name}") for c in claimants)
        return (f"{kind} {name!r} is registered by more than one plugin: {who}; say which one with a "
                f"qualified name, {choices} (or uninstall one)")

    # -- lookup ---------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """Names usable as they are (ambiguous ones need a ``DIST:`` qualifier)."""
        return sorted(self._components[kind])

    def components(self, kind: Optional[str] = None) -> list[Component]:
        """Every registered component, the claimants of ambiguous names included."""
        kinds = [kind] if kind else list(KINDS)
        out = []
        for k in kinds:
            for n in sorted(set(self._components[k]) | set(self._conflicts[k])):
                out += self._conflicts[k].get(n) or [self._components[k][n]]
        return out

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``; ``DIST:NAME`` picks the one a distribution (or
        entry point) provides when several register ``NAME``."""
        if kind not in self._components:
            raise PluginError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        if not isinstance(name, str):
            raise PluginError(f"{kind} name must be a string, got {short_repr(name)}")
        qualifier, sep, plain = name.rpartition(":")
        if sep:
            found = [c for c in self._conflicts[kind].get(plain) or
                     ([self._components[kind][plain]] if plain in self._components[kind] else [])
                     if _normalise(c.distribution) == _normalise(qualifier) or c.plugin == qualifier]
            if len(found) == 1:
                return found[0]
            if found:
                raise PluginError(self.conflict_message(kind, plain) + "; the qualifier matches more than one")
            providers = ", ".join(sorted({c.distribution for c in self.components(kind) if c.name == plain}))
            raise PluginError(f"unknown {kind} {short_repr(name)}: no distribution or entry point "
                              f"{short_repr(qualifier)} provides {kind} {short_repr(plain)}"
                              + (f" (provided by: {providers})" if providers else ""))
        if name in self._conflicts[kind]:
            raise PluginError(self.conflict_message(kind, name))
        try:
            return self._components[kind][name]
        except KeyError:
            raise PluginError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        available = self.names(kind)
        plural = "losses" if kind == "loss" else kind + "s"
        msg = f"unknown {kind} {short_repr(name)}. Available {plural}: {', '.join(available) or '(none)'}"
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

    def build(self, kind: str, name: str, /, **kwargs: Any) -> Any:
        """``factory(**kwargs)``; any failure of the factory (a recipe ``args`` key it does not
        accept, a value it refuses, a missing file, ``sys.exit``) is a PluginError naming the
        component. ``kind`` and ``name`` are positional-only: a plugin argument may be called
        ``name`` (or ``kind``)."""
        from . import lifecycle

        comp = self.get(kind, name)
        try:
            with lifecycle.phase(f"building {kind} {name!r}", plugin=f"{comp.distribution}:{comp.plugin}"):
                return comp.factory(**kwargs)
        except (PluginError, KeyboardInterrupt, lifecycle.Stopped):
            raise
        except SystemExit as exc:  # plugin code may not end the process: its failure, by name
            raise PluginError(f"{kind} {name!r} (plugin {comp.plugin!r}, {comp.distribution}) called "
                              f"sys.exit({exc.code!r}) while being built; a plugin must raise an exception "
                              "instead") from None
        except Exception as exc:  # noqa: BLE001 - one line naming the plugin, not a traceback
            # Name the files it was given: the library's own message often does not.
            files = "".join(f", {k}={short_repr(v, 160)}" for k, v in kwargs.items()
                            if k in ("pretrained", "checkpoint", "path", "root") and isinstance(v, str))
            raise PluginError(f"{kind} {name!r} (plugin {comp.plugin!r}, {comp.distribution}) "
                              f"could not be built with args {sorted(kwargs)}{files}: "
                              f"{type(exc).__name__}: {short_repr(exc, 400, quote=False)}") from exc

    @property
    def hook(self):
        return self.plugin_manager.hook

    def plugin_in_traceback(self, tb: Any) -> Optional[str]:
        """``DIST (entry point)`` of the plugin whose code is innermost in traceback ``tb`` (its
        registered module, or the module of one of its factories), or None."""
        owners: dict[str, str] = {}
        for comp in self.components():
            module = getattr(comp.factory, "__module__", None)
            if module:
                owners.setdefault(module, f"{comp.distribution} ({comp.plugin})")
        for key, plugin in self.plugin_manager.list_name_plugin():
            module = getattr(plugin, "__name__", None)
            if module:
                dist, _, entry = key.rpartition(":")
                owners[module] = f"{dist or '<local>'} ({entry})"
        frames = []
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):
            owner = owners.get(frame.f_globals.get("__name__", ""))
            if owner:
                return owner
        return None


_DEFAULT: Optional[Registry] = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, discovered from installed entry points on first use."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        reg = Registry()
        reg.load_entry_points()
        _DEFAULT = reg
    return _DEFAULT

