"""Checks of a validated recipe against the plugin registry, before any model is built."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..arguments import check_args
from ..recipe import Recipe, RecipeError
from ..registry import PluginError, Registry
from ..utils import real_path


#: kernel file systems: nothing a run writes belongs there (/dev/shm, a tmpfs, is allowed).
PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def check_output_dir(recipe: Recipe, origin: str = "<recipe>") -> None:
    """``output_dir`` must be a directory or creatable as one, and not on a kernel file system
    (/proc, /sys, /dev): nothing is created here. (As root, ``os.access`` says yes to /proc.)"""
    path = Path(recipe.output_dir).expanduser()
    real = real_path(path)
    for fs in PSEUDO_FILESYSTEMS:
        if (real == Path(fs) or Path(fs) in real.parents) and Path("/dev/shm") not in [real, *real.parents]:
            raise RecipeError(f"{origin}: output_dir: {path} is on the kernel file system {fs}, where a run cannot "
                              "write its files; choose a directory on a disk")
    probe = path
    while True:
        if probe.exists() or probe.is_symlink():
            break
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.exists():  # a dangling symlink somewhere on the way
        raise RecipeError(f"{origin}: output_dir: {path} cannot be created ({probe} is a broken link)")
    if not probe.is_dir():
        what = "is not a directory" if probe == path else f"cannot be created: {probe} is a file"
        raise RecipeError(f"{origin}: output_dir: {path} {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        raise RecipeError(f"{origin}: output_dir: {path} {verb}")


def check_plugins(recipe: Recipe, registry: Registry, origin: str = "<recipe>") -> None:
    """Every plugin name the recipe uses must be registered; report all problems at once."""
    problems = []

    def need(kind: str, name: str, field: str, args: Optional[dict] = None, args_field: str = "") -> None:
        try:
            component = registry.get(kind, name)
        except PluginError as exc:
            problems.append(f"{origin}: {field}: {exc}")
            return
        if args is not None:  # bind the recipe's args to the factory's signature, without calling it
            problems.extend(f"{origin}: {p}" for p in check_args(kind, name, component.factory, args, args_field))

    need("student", recipe.student.name, "student.name", recipe.student.args, "student.args")
    need("adaptor", recipe.adaptor.name, "adaptor.name", recipe.adaptor.args, "adaptor.args")
    need("dataset", recipe.data.source.name, "data.source.name", recipe.data.source.args, "data.source.args")
    need("dataset", recipe.eval.source.name, "eval.source.name", recipe.eval.source.args, "eval.source.args")
    for tname, t in recipe.teachers.items():
        where = f"teachers.{tname}"
        need("teacher", t.plugin, f"{where}.plugin", t.args, f"{where}.args")
        need("loss", t.summary_loss.name, f"{where}.summary_loss.name", t.summary_loss.args, f"{where}.summary_loss.args")
        need("loss", t.spatial_loss.name, f"{where}.spatial_loss.name", t.spatial_loss.args, f"{where}.spatial_loss.args")
        if t.adaptor is not None:
            need("adaptor", t.adaptor.name, f"{where}.adaptor.name", t.adaptor.args, f"{where}.adaptor.args")
    if recipe.balance is not None:
        need("balancer", recipe.balance.name, "balance.name", recipe.balance.args, "balance.args")
    if problems:
        raise RecipeError("\n".join(problems))
    check_shifted_views(recipe, registry, origin)


def check_shifted_views(recipe: Recipe, registry: Registry, origin: str = "<recipe>") -> None:
    """With ``augment.shift`` the student's and the teachers' views differ: every spatial loss
    must compare them on their overlap (a loss with ``wants_geometry``)."""
    shift = recipe.augment.shift
    if not shift:
        return
    for tname, t in recipe.teachers.items():
        if not t.use_spatial:
            continue
        loss = registry.build("loss", t.spatial_loss.name, **t.spatial_loss.args)
        if not getattr(loss, "wants_geometry", False):
            base = t.spatial_loss.name
            raise RecipeError(f"{origin}: teachers.{tname}.spatial_loss: augment.shift is {shift:g}, so student and "
                              f"teacher views differ, but loss {base!r} compares the grids cell by cell; use "
                              f"{{name: shift_equivariant, args: {{base: {{name: {base}}}}}}}")


def check_recipe(recipe: Recipe, registry: Registry, world_size: int = 1, origin: str = "<recipe>") -> None:
    """Everything that can be checked before any model is built with weights: plugin names,
    the rank partition for ``world_size``, and student resolutions against the student's
    size multiple (the student is built on the meta device for that)."""
    import torch

    from .partition import plan_stages

    check_plugins(recipe, registry, origin)
    check_output_dir(recipe, origin)
    try:
        plans = plan_stages(recipe, world_size)
    except RecipeError as exc:
        raise RecipeError(f"{origin}: {exc}") from None
    with torch.device("meta"):
        try:
            student = registry.build("student", recipe.student.name, **recipe.student.args, num_cls_tokens=1)
        except PluginError as exc:
            raise PluginError(f"{origin}: student: {exc}") from None
    check_student_resolutions(plans, student.size_multiple, recipe.student.name, origin)


def check_student_resolutions(plans: list, multiple: int, student: str, origin: str = "<recipe>") -> None:
    """Every student resolution of every stage and group must be a multiple of ``multiple``."""
    for plan in plans:
        for slots in plan.rank_slots:
            for slot in slots:
                for h, w in slot.student_resolution:
                    if h % multiple or w % multiple:
                        near = (max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple))
                        raise RecipeError(
                            f"{origin}: student.resolution: {h}x{w} (group {slot.group}) is not a multiple of "
                            f"{multiple}, the input size multiple of student {student!r}; "
                            f"nearest valid: {near[0]}x{near[1]}")


def check_mosaic_cache(plans: list, cached: set[str]) -> None:
    """A feature cache holds each image's own targets: a group that tiles its images into
    mosaics cannot read them (its teachers see canvases)."""
    for plan in plans:
        for slots in plan.rank_slots:
            for slot in slots:
                clash = sorted(set(slot.teachers) & cached) if slot.mosaic else []
                if clash:
                    raise RecipeError(f"groups.{slot.group}.mosaic: teachers {clash} are read from the feature cache, "
                                      "which holds single images' features, not mosaics'; leave them out of "
                                      "cache.teachers or drop the mosaic")
