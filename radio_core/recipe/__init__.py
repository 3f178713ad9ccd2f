"""Recipes: the pydantic schema (``schema``) and how YAML files become a ``Recipe`` (``loader``)."""
from .loader import apply_overrides, deep_merge, dump_recipe, load_raw, load_recipe, validate
from .schema import (
                     AugmentSpec,
                     CacheSpec,
                     CheckpointSpec,
                     ComponentSpec,
                     DataSpec,
                     EvalSpec,
                     FSDPSpec,
                     GroupSpec,
                     LoggingSpec,
                     OptimSpec,
                     Recipe,
                     RecipeError,
                     ScheduleSpec,
                     StageSpec,
                     StudentSpec,
                     TeacherSpec,
                     TrainSpec,
)

__all__ = ["AugmentSpec", "CacheSpec", "CheckpointSpec", "ComponentSpec", "DataSpec", "EvalSpec", "FSDPSpec", "GroupSpec",
           "LoggingSpec", "OptimSpec", "Recipe", "RecipeError", "ScheduleSpec", "StageSpec", "StudentSpec",
           "TeacherSpec", "TrainSpec", "apply_overrides", "deep_merge", "dump_recipe", "load_raw", "load_recipe",
           "validate"]
