"""The package layout is the architecture: imports inside radio_core/ and plugins/ form no cycle
and only go down the documented layer order (CONTRIBUTING.md, "Layout")."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import from its own layer or any layer below it.
LAYERS = [
    ["radio_core.utils", "radio_core.progress", "radio_core.locks", "radio_core.lifecycle"],
    ["radio_core.protocols", "radio_core.hookspecs", "radio_core.registry", "radio_core.arguments"],
    ["radio_core.recipe"],
    ["radio_core.models"],
    ["radio_core.plan", "radio_core.data"],
    ["radio_core.formats"],
    ["radio_core.eval"],
    ["radio_core.train"],
    ["radio_core.sweep"],
    ["radio_core.run", "radio_core.cli", "radio_core.plugins", "radio_core.builtins", "radio_core.model",
     "radio_core"],
]


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "plugins":
        parts[0] = "radio_plugins"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every radio_core / radio_plugins name ``path`` imports (top level or inside functions);
    ``from pkg import x`` gives ``pkg.x``, which ``resolve`` maps to the module ``pkg.x`` if it
    exists and to ``pkg`` otherwise."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in ("radio_core", "radio_plugins")}


def all_modules(root: Path = ROOT) -> dict[str, Path]:
    files = list((root / "radio_core").rglob("*.py")) + list((root / "plugins").glob("*.py"))
    return {module_name(p, root): p for p in files}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import name refers to (``a.b.func`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = all_modules(root)
    return {m: {t for t in (resolve(i, modules) for i in imports_of(p, root)) if t and t != m}
            for m, p in modules.items()}


def layer_of(module: str) -> int:
    best, index = "", None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > len(best):
                best, index = n, i
    assert index is not None, f"{module} is in no layer: add it to LAYERS and to CONTRIBUTING.md"
    return index


def find_cycle(g: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                raise CycleFound(stack[stack.index(n):] + [n])
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    try:
        for m in sorted(g):
            if m not in state:
                visit(m)
    except CycleFound as found:
        return found.args[0]
    return []


class CycleFound(Exception):
    pass


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in g.items():
        if not m.startswith("radio_core"):
            continue
        for t in targets:
            if t.startswith("radio_plugins"):
                bad.append(f"{m} imports the plugin module {t}")
            elif t != "radio_core" and layer_of(t) > layer_of(m):
                bad.append(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})")
    return sorted(bad)


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_core_imports_only_downward():
    bad = upward_imports(graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_plugins_use_only_the_public_contract():
    allowed = ("radio_core", "radio_core.protocols", "radio_core.hookspecs", "radio_core.registry",
               "radio_core.models.spectral", "radio_core.models.attention", "radio_core.models.activations",
               "radio_core.utils")
    bad = []
    for m, targets in graph().items():
        if not m.startswith("radio_plugins"):
            continue
        for t in targets:
            if t.startswith("radio_core") and t not in allowed:
                bad.append(f"{m} imports {t}")
            # helper modules (radio_plugins._<job>: no entry point) may be shared; plugins may not
            if t.startswith("radio_plugins.") and not t.startswith("radio_plugins._"):
                bad.append(f"{m} imports another plugin, {t} (shared code belongs in a radio_plugins._<job> "
                           f"helper module)")
    assert not bad, "\n".join(sorted(bad))


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checker itself, on a small tree: a function-level relative import that closes a
    cycle, and an evaluation module that imports the training loop."""
    files = {
        "radio_core/__init__.py": "",
        "radio_core/eval/__init__.py": "",
        "radio_core/eval/tasks.py": "def f():\n    from ..train.loop import Trainer\n",
        "radio_core/train/__init__.py": "",
        "radio_core/train/loop.py": "from ..eval import tasks\n",
        "plugins/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    g = graph(tmp_path)
    assert g["radio_core.eval.tasks"] == {"radio_core.train.loop"}
    assert find_cycle(g) == ["radio_core.eval.tasks", "radio_core.train.loop", "radio_core.eval.tasks"]
    assert upward_imports(g) == ["radio_core.eval.tasks (layer 6) imports radio_core.train.loop (layer 7)"]


def test_every_package_is_installed():
    """A regular (non-editable) install ships only the packages pyproject.toml lists."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent) if p.parent != ROOT / "plugins" else "radio_plugins"
             for p in (ROOT / "radio_core").rglob("__init__.py")} | {"radio_plugins", "radio_proxy"}
    assert found == listed, f"pyproject packages: missing {sorted(found - listed)}, extra {sorted(listed - found)}"
