"""Frozen teachers: building them from a recipe, grouping by input size, computing targets."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import lifecycle
from ..protocols import Teacher, TeacherOutput
from ..registry import PluginError, Registry
from . import preprocess

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass
class TeacherGroup:
    """Teachers that share an input size and resize mode: their input is resized once."""

    input_size: tuple[int, int]
    resize_mode: str
    names: list[str] = field(default_factory=list)


def group_teachers(teachers: dict[str, Teacher]) -> list[TeacherGroup]:
    groups: dict[tuple, TeacherGroup] = {}
    for name, t in teachers.items():
        key = (tuple(t.input_size), t.resize_mode)
        groups.setdefault(key, TeacherGroup(tuple(t.input_size), t.resize_mode)).names.append(name)
    return list(groups.values())


def build_teacher(recipe: "Recipe", name: str, registry: Registry, meta: bool = False,
                  resolution: Any = None, upsampled: bool = False) -> Teacher:
    """Build (and freeze) one teacher; ``meta=True`` builds its architecture without weights,
    only to learn its dimensions (plugins that don't support it are built for real).
    ``resolution`` overrides the recipe's (a group's ``teacher_resolution``); ``upsampled``
    wraps it with the recipe's ``upsampler`` (FeatSharp)."""
    spec = recipe.teachers[name]
    resolution = resolution or spec.resolution
    kwargs: dict[str, Any] = dict(spec.args, resolution=tuple(resolution) if resolution else None)
    if meta and accepts_kwarg(registry.get("teacher", spec.plugin).factory, "meta"):
        kwargs["meta"] = True
    try:
        teacher = registry.build("teacher", spec.plugin, **kwargs)
    except PluginError as exc:
        raise PluginError(f"teachers.{name}: {exc}") from None
    if not isinstance(teacher, Teacher):
        raise PluginError(f"teachers.{name}: plugin {spec.plugin!r} returned {type(teacher).__name__}, "
                          "not a radio_core.Teacher")
    comp = registry.get("teacher", spec.plugin)
    teacher.radio_plugin = f"{comp.distribution}:{comp.plugin}"  # named by stop messages and the watchdog
    teacher = teacher.freeze()
    return with_upsampler(recipe, name, teacher) if upsampled else teacher


def with_upsampler(recipe: "Recipe", name: str, base: Teacher) -> Teacher:
    """``base`` wrapped with its FeatSharp upsampler: loaded from the recipe's ``path`` (or the
    fingerprinted cache) and checked against the teacher's weights, resolution and the factor;
    a meta-device ``base`` gets an untrained one (dry runs: only shapes and FLOPs count)."""
    from . import featsharp

    spec = recipe.teachers[name]
    up = spec.upsampler
    param = next(iter(base.parameters()), None)
    grid = featsharp.feature_grid(base)
    if param is not None and param.is_meta:
        with torch.device("meta"):
            upsampler = featsharp.FeatSharp(featsharp.FeatSharpConfig(base.spatial_dim, grid, up.factor))
    else:
        ident = featsharp.identity(spec.plugin, spec.args, base)
        path = up.path or featsharp.default_path(spec.plugin, ident["fingerprint"], tuple(base.input_size), up.factor)
        upsampler = featsharp.load(path, base, ident, up.factor, f"teachers.{name}.upsampler")
        if param is not None:
            upsampler = upsampler.to(param.device)
    return featsharp.FeatSharpTeacher(base, upsampler).freeze()


def check_teacher_output(name: str, plugin: str, teacher: Teacher, out: Any, batch: int,
                         finite: bool = False) -> None:
    """Type, dtype and shape checks (no host sync): a plugin that breaks the protocol is named.
    ``finite=True`` (the trainer's first batch per teacher) also checks that the values are
    finite, at the cost of one host sync."""
    where = f"teachers.{name} (plugin {plugin!r})"
    if not isinstance(out, TeacherOutput):
        raise PluginError(f"{where}: forward returned {type(out).__name__}, not a TeacherOutput")
    for part, t in (("spatial", out.spatial), ("summary", out.summary)):
        if t is None and part == "summary":
            continue
        if not isinstance(t, Tensor):
            raise PluginError(f"{where}: {part} output is {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise PluginError(f"{where}: {part} output has dtype {str(t.dtype).removeprefix('torch.')}, "
                              "not floating point")
        if finite and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise PluginError(f"{where}: {part} output holds {bad} non-finite value(s) of {t.numel()} on the first "
                              "batch; check the teacher's weights (pretrained=) and train.teacher_dtype")
    sp = out.spatial
    if sp.dim() != 4 or sp.shape[0] != batch or sp.shape[1] != teacher.spatial_dim:
        raise PluginError(f"{where}: spatial output has shape {tuple(sp.shape)}; expected "
                          f"({batch}, spatial_dim={teacher.spatial_dim}, h, w)")
    if teacher.summary_dim is None:
        return
    sm = out.summary
    if sm is None or tuple(sm.shape) != (batch, teacher.summary_dim):
        got = None if sm is None else tuple(sm.shape)
        raise PluginError(f"{where}: summary output has shape {got}; expected ({batch}, {teacher.summary_dim})")


def accepts_kwarg(fn: Any, name: str) -> bool:
    """Whether ``fn`` names the parameter explicitly (a ``**kwargs`` catch-all does not count)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


@torch.no_grad()
def compute_targets(teachers: dict[str, Teacher], resize_sets: list, images01: torch.Tensor,
                    autocast: Any = None, check: Any = None) -> dict[str, TeacherOutput]:
    """Every teacher's targets for a batch of [0, 1] crops: resize once per input size, then
    normalise, run, and crop away grid cells that only saw padding."""
    targets = {}
    with autocast if autocast is not None else contextlib.nullcontext():
        for group in resize_sets:
            g = preprocess.group_input(images01, group.input_size, group.resize_mode)
            for name in group.names:
                t = teachers[name]
                with lifecycle.phase(f"forward of teacher {name!r}", getattr(t, "radio_plugin", None)):
                    out = t(preprocess.teacher_input(g, t.mean, t.std))
                if check is not None:
                    check(name, t, out, images01.shape[0])
                spatial = preprocess.crop_valid(out.spatial, g.valid_fraction)
                targets[name] = TeacherOutput(summary=out.summary.float() if out.summary is not None else None,
                                              spatial=spatial.float())
    return targets
