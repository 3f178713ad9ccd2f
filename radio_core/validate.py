"""Checks of a validated recipe against the plugin registry, before any model is built."""
from __future__ import annotations

from .recipe import Recipe, RecipeError
from .registry import Registry


def check_plugins(recipe: Recipe, registry: Registry, origin: str = "<recipe>") -> None:
    """Every plugin name the recipe uses must be registered; report all problems at once."""
    problems = []

    def need(kind: str, name: str, field: str) -> None:
        if name not in registry.names(kind):
            problems.append(f"{origin}: {field}: {registry.unknown_message(kind, name)}")

    need("student", recipe.student.name, "student.name")
    need("adaptor", recipe.adaptor.name, "adaptor.name")
    need("dataset", recipe.data.source.name, "data.source.name")
    for tname, t in recipe.teachers.items():
        need("teacher", t.plugin, f"teachers.{tname}.plugin")
        need("loss", t.summary_loss.name, f"teachers.{tname}.summary_loss.name")
        need("loss", t.spatial_loss.name, f"teachers.{tname}.spatial_loss.name")
        if t.adaptor is not None:
            need("adaptor", t.adaptor.name, f"teachers.{tname}.adaptor.name")
    if problems:
        raise RecipeError("\n".join(problems))
