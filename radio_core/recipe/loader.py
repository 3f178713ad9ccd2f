"""Reading recipes: YAML (``yaml.safe_load``), ``base:`` includes, dotted overrides, clear errors."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from ..utils import closest
from .schema import Recipe, RecipeError


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """Mappings merge key by key; everything else in ``over`` replaces ``base``.
    A value of ``null`` in ``over`` for a mapping key deletes it (to drop an inherited teacher)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None and isinstance(out.get(k), dict):
            del out[k]
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe and its ``base:`` chain into one merged mapping."""
    path = Path(path).resolve()
    if path in _chain:
        raise RecipeError(f"{path}: circular base include via {' -> '.join(map(str, _chain))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str):
            raise RecipeError(f"{path}: base must be a path or a list of paths, got {b!r}")
        merged = deep_merge(merged, load_raw(path.parent / b, _chain + (path,)))
    return deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``1e-3``, ``[224, 224]``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"{source}: override {item!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source}: override {item!r}: value is not valid YAML: {exc}") from None
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"{source}: override {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return data


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent_model = _model_at(Recipe, err["loc"][:-1])
            if parent_model is not None:
                guess = closest(str(err["loc"][-1]), parent_model.model_fields)
                valid = ", ".join(parent_model.model_fields)
                msg += f" (did you mean {guess!r}?)" if guess else f" (valid keys: {valid})"
        elif "input" in err and err["type"] not in ("missing",):
            msg += f" (got {err['input']!r})"
        lines.append(f"{origin}: {loc}: {msg}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class found by walking ``loc`` through fields (dict keys skipped)."""
    import typing

    current: Any = model
    for part in loc:
        if isinstance(current, tuple):  # a dict key (e.g. the teacher's name): step into the value type
            current = current[1]
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        origin = typing.get_origin(ann)
        if origin is dict:
            ann = typing.get_args(ann)[1]
            current = ("dict", ann)
            continue
        if origin is Union:
            ann = next((a for a in typing.get_args(ann) if a is not type(None)), ann)
        current = ann
    if isinstance(current, tuple):
        current = current[1]
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
