"""Reading recipes: YAML (``RecipeLoader``: a safe loader that refuses duplicate keys and reads
YAML 1.2 numbers and booleans), ``base:`` includes, dotted overrides, clear bounded errors."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from ..utils import UserFileError, closest, read_user_text, real_path, short_repr
from .schema import Recipe, RecipeError


#: a recipe larger than this (bytes) or expanding (YAML aliases) to more nodes is refused.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags) that refuses duplicate mapping keys and reads numbers
    and booleans as YAML 1.2 does: ``1e-3`` is a float, ``yes``/``no``/``on``/``off`` are strings."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # resolve '<<' merge keys first: they may be overridden
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: construct_mapping reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)} (first at line {first.line + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


RecipeLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: ``line L, column C: problem``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def parse_yaml(text: str, origin: str) -> Any:
    """YAML text -> Python data with ``RecipeLoader``; every failure is one RecipeError line."""
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise RecipeError(f"{origin}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise RecipeError(f"{origin}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise RecipeError(f"{origin}: not a usable value: {short_repr(exc, 120, quote=False)}") from None
    _check_size(data, origin)
    return data


def _check_size(data: Any, origin: str) -> None:
    """Refuse data that expands (YAML aliases) to more than MAX_RECIPE_NODES nodes or nests
    deeper than 50 levels."""
    count = 0
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_RECIPE_NODES or depth > 50:
            what = "too large" if count > MAX_RECIPE_NODES else "nested too deeply"
            raise RecipeError(f"{origin}: recipe is {what} (more than {MAX_RECIPE_NODES} values or 50 levels, "
                              f"counting YAML aliases expanded)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for kv in node.items() for v in kv)
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def _read_yaml(path: Path, origin: Optional[str] = None) -> dict:
    """``origin``: how the file was named (``FILE: base:`` for an include). The file is checked
    before it is read (``utils.read_user_text``): a FIFO, a device such as /dev/zero, a symlink
    loop or a file over MAX_RECIPE_BYTES is one error line, never a hang or a MemoryError."""
    origin = origin or str(path)
    if path.is_dir():
        raise RecipeError(f"{origin}: {path} is a directory, not a YAML recipe file")
    if not path.exists() and not path.is_symlink():
        raise RecipeError(f"{origin}: recipe file not found: {path}")
    try:
        text = read_user_text(path, "recipe", MAX_RECIPE_BYTES)
    except UserFileError as exc:  # names the file itself; an include also names where it was asked for
        raise RecipeError(str(exc) if origin == str(path) else f"{origin}: {exc}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise RecipeError(f"{path}: top-level key {short_repr(key)} is not a name")
    return data


#: the keys that name a component's plugin; its ``args`` belong to that plugin
PLUGIN_KEYS = ("name", "plugin")


def renames_plugin(base: dict, over: dict) -> bool:
    """``over`` names a different plugin than ``base`` for the same component."""
    return any(k in over and k in base and over[k] != base[k] for k in PLUGIN_KEYS)


def deep_merge(base: dict, over: dict) -> dict:
    """Mappings merge key by key; everything else in ``over`` replaces ``base``.
    A value of ``null`` in ``over`` for a mapping key deletes it (to drop an inherited teacher).
    Where ``over`` names another plugin (``name``/``plugin``), the inherited ``args`` are not
    kept: they are the old plugin's, and would be unknown arguments to the new one."""
    out = copy.deepcopy(base)
    if renames_plugin(out, over):
        out.pop("args", None)
    for k, v in over.items():
        if v is None and isinstance(out.get(k), dict):
            del out[k]
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


#: ``base:`` includes: the deepest chain, and the most files one recipe may read in all.
MAX_BASE_DEPTH = 16
MAX_RECIPE_FILES = 64


def load_raw(path: str | Path, _chain: tuple[Path, ...] = (), _origin: Optional[str] = None,
             _count: Optional[list] = None) -> dict:
    """Read a recipe and its ``base:`` chain into one merged mapping (at most MAX_BASE_DEPTH
    levels and MAX_RECIPE_FILES files: a fan-out of includes cannot read a file a million times)."""
    if "\0" in str(path):
        raise RecipeError(f"{_origin or 'recipe'}: path {short_repr(str(path))} contains a NUL byte")
    if _origin is None and Path(path).is_symlink():
        _origin = str(path)  # name the file as the user did, and where its link leads
    path = real_path(path)  # a symlink loop stays unresolved: reading it is one error line
    if path in _chain:
        raise RecipeError(f"{path}: circular base include via {' -> '.join(map(str, _chain))}")
    if len(_chain) >= MAX_BASE_DEPTH:
        raise RecipeError(f"{_origin or path}: base: includes nest deeper than {MAX_BASE_DEPTH} files")
    _count = [0] if _count is None else _count
    _count[0] += 1
    if _count[0] > MAX_RECIPE_FILES:
        raise RecipeError(f"{_origin or path}: base: includes read more than {MAX_RECIPE_FILES} files")
    data = _read_yaml(path, _origin)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str) or not b:
            raise RecipeError(f"{path}: base: must be a path or a list of paths, got {short_repr(b)}")
        origin = f"{path}: base: {short_repr(b, 200, quote=False)}"
        merged = deep_merge(merged, load_raw(path.parent / b, _chain + (path,), origin, _count))
    return deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``1e-3``, ``[224, 224]``).
    ``null`` for a key that holds a mapping removes it (``teachers.sam=null`` drops a teacher).
    An override that names another plugin (``student.name=eradio``) drops the old plugin's
    inherited ``args``, except those that other overrides set."""
    original, data = data, copy.deepcopy(data)
    touched, renamed = [], []
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        shown = short_repr(item)
        if not sep or not key:
            raise RecipeError(f"{source}: override {shown} is not of the form key.path=value")
        parts = key.split(".")
        if not all(parts):
            raise RecipeError(f"{source}: override {shown}: {short_repr(key)} has an empty part")
        value = parse_yaml(raw, f"{source}: override {shown}: value") if raw != "" else ""
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"{source}: override {shown}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        if parts[-1] in PLUGIN_KEYS and node.get(parts[-1], value) != value:
            renamed.append(tuple(parts[:-1]))
        touched.append(tuple(parts))
        if value is None and isinstance(node.get(parts[-1]), dict):
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
    for path in renamed:
        _drop_inherited_args(data, original, path, touched)
    return data


def _drop_inherited_args(data: dict, original: dict, path: tuple, touched: list[tuple]) -> None:
    """Remove from ``data`` at ``path``.args the keys that came from ``original`` and that no
    override in ``touched`` set."""
    node, old = data, original
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        old = old.get(part) if isinstance(old, dict) else None
    args, old_args = (node or {}).get("args"), (old or {}).get("args")
    if not isinstance(args, dict) or not isinstance(old_args, dict):
        return
    mine = path + ("args",)
    if any(t[:len(mine)] == mine and len(t) == len(mine) for t in touched):
        return  # the args mapping itself was given
    for key in list(args):
        if key in old_args and not any(t[:len(mine) + 1] == mine + (key,) for t in touched):
            del args[key]


def _format_errors(exc: ValidationError, origin: str) -> str:
    """One line per problem (pydantic's order), each naming file and field; bounded."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent_model = _model_at(Recipe, err["loc"][:-1])
            if parent_model is not None:
                guess = closest(str(err["loc"][-1]), parent_model.model_fields)
                valid = ", ".join(parent_model.model_fields)
                msg += f" (did you mean {guess!r}?)" if guess else f" (valid keys: {valid})"
        elif "input" in err and err["type"] not in ("missing", "value_error"):
            msg += f" (got {short_repr(err['input'])})"
        lines.append(f"{origin}: {short_repr(loc, 120, quote=False)}: {msg}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class found by walking ``loc`` through fields (dict keys and list
    indices skipped)."""
    import typing

    def unwrap(ann: Any) -> Any:
        while True:
            origin = typing.get_origin(ann)
            if origin is Annotated:
                ann = typing.get_args(ann)[0]
            elif origin is Union:
                ann = next((a for a in typing.get_args(ann) if a is not type(None)), ann)
            else:
                return ann

    current: Any = model
    pending_container = False
    for part in loc:
        if pending_container:  # a dict key or list index: step into the value type
            pending_container = False
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        ann = unwrap(field.annotation)
        origin = typing.get_origin(ann)
        if origin in (dict, list):
            ann = unwrap(typing.get_args(ann)[-1])
            pending_container = True
        current = ann
    if pending_container:
        return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def validate(data: dict, origin: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, origin)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, include ``base:`` files, apply overrides, validate."""
    data = load_raw(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, origin=str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
