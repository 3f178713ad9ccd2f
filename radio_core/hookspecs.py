"""pluggy hook specifications of the ``radio_core`` entry-point group.

A plugin is a module (or object) named by an entry point in the group ``radio_core``::

    [project.entry-points.radio_core]
    my_teachers = "my_package.radio_plugin"

and implements any of these hooks with ``@radio_core.hookimpl``. Registration is cheap by
design: register factories, and import heavy model libraries inside them, so that listing
plugins never imports model code.
"""
from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "radio_core"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def radio_register(registry: Any) -> None:
    """Register component factories on the ``radio_core.Registry`` passed in:
    ``registry.add("teacher", "clip", build_clip)``."""


@hookspec
def radio_prepare(recipe: Any, teachers: list) -> None:
    """Called in every process of a training run before any model is built, with the recipe
    and the names of the teachers this run builds: the place to make expensive artefacts the
    factories will need (fetch weights, train a teacher), in parallel if worthwhile. Must be
    safe to run in several processes at once (file locks)."""


@hookspec
def radio_train_start(trainer: Any) -> None:
    """Called once the trainer has built every model, before the first step."""


@hookspec
def radio_step_end(trainer: Any, step: int, metrics: dict) -> None:
    """Called after each optimiser step on every rank; ``metrics`` holds the logged scalars
    on steps where the trainer logs, and is empty otherwise (to avoid host syncs)."""


@hookspec
def radio_checkpoint_saved(trainer: Any, path: str) -> None:
    """Called on the main process after a checkpoint directory is complete."""


@hookspec
def radio_train_end(trainer: Any) -> None:
    """Called after the last step (also after an interrupted run has checkpointed)."""
