"""The trainable part of a distillation run: student + per-teacher adaptor heads.

Teachers are *not* children of this module (they are frozen, never wrapped by DDP and never
checkpointed); the trainer owns them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Optional

import torch
from torch import Tensor, nn

from .. import lifecycle
from ..protocols import Student, StudentOutput, TeacherOutput
from ..registry import PluginError, Registry
from .losses import build_losses
from .target_norm import build_target_norm

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass
class HeadSpec:
    """What the distiller needs to know about one teacher to build its heads."""

    name: str
    summary_dim: Optional[int]  # None: no summary head
    spatial_dim: Optional[int]  # None: no spatial head
    #: the spatial head reads the student's tokens after this block (intermediate-layer target)
    student_layer: Optional[int] = None


class Distiller(nn.Module):
    """``student`` plus ``summary_heads[teacher]`` and ``spatial_heads[teacher]``.

    Each teacher with a summary target reads its own CLS token: ``summary_slots[teacher]``
    indexes ``StudentOutput.summary`` (RADIO's ``cls_token_per_teacher``).
    ``target_norms[teacher]["summary" | "spatial"]`` (optional) hold the statistics that
    standardise that teacher's targets (radio_core.normalize); they are buffers, so they are
    saved with checkpoints and exports. ``losses[teacher]["summary" | "spatial"]`` are the loss
    modules the training objective uses: kept here so that losses with statistics (buffers)
    are checkpointed; exports leave them out.
    """

    def __init__(self, student: Student, heads: list[HeadSpec], summary_heads: dict[str, nn.Module],
                 spatial_heads: dict[str, nn.Module], target_norms: Optional[dict[str, nn.Module]] = None,
                 losses: Optional[dict[str, nn.Module]] = None) -> None:
        super().__init__()
        self.student = student
        self.heads = heads
        self.summary_heads = nn.ModuleDict(summary_heads)
        self.spatial_heads = nn.ModuleDict(spatial_heads)
        self.target_norms = nn.ModuleDict(target_norms or {})
        self.losses = nn.ModuleDict(losses or {})
        self.spatial_layers = {h.name: h.student_layer for h in heads if h.student_layer is not None}
        if self.spatial_layers:
            if not hasattr(student, "intermediate_layers"):
                raise PluginError(f"teachers {sorted(self.spatial_layers)} ask for intermediate student layers "
                                  f"(student_layer), which student {type(student).__name__} cannot return")
            student.intermediate_layers = tuple(sorted(set(self.spatial_layers.values())))
        with_summary = [h.name for h in heads if h.summary_dim is not None]
        self.summary_slots = {name: i % max(student.num_cls_tokens, 1) for i, name in enumerate(with_summary)}
        #: the student's plugin name, for messages (``build_distiller`` sets it)
        self.student_name = type(student).__name__
        self._checked_finite = False
        self.last_output_finite: Optional[Tensor] = None

    def forward(self, images: Tensor, return_predictions: bool = False, active: Optional[Collection[str]] = None):
        """Student features; with ``return_predictions`` also every head's output, computed
        inside forward so DDP sees all parameters used on every rank.

        ``active``: the teachers with targets in this batch (None: all). The heads of the others
        only touch their parameters, on one token of the first sample (for a zero-weighted loss
        term that keeps DDP's gradient buckets complete), instead of running over every token of
        the batch: a SAM-group rank at 1024 px then does not run the CLIP/DINOv2 heads over
        4096 tokens per image."""
        with lifecycle.phase(f"forward of student {self.student_name!r}"):
            out = self.student(images)
        self._check_student_output(out, images.shape[0])
        if not return_predictions:
            return out
        token = None
        if active is not None and any(h.name not in active for h in self.heads):
            token = StudentOutput(summary=out.summary[:1], patches=out.patches[:1, :1], grid=(1, 1),
                                  intermediates={k: v[:1, :1] for k, v in out.intermediates.items()})
        return out, {h.name: self.predict(out if token is None or h.name in active else token, h.name)
                     for h in self.heads}

    def _check_student_output(self, out: Any, batch: int) -> None:
        """The student's outputs checked as teachers' are: type, dtype and shapes on every call
        (no host sync), values finite on the first call (one sync; later ``last_output_finite``
        holds a flag the trainer reads when a loss turns non-finite). PluginError names the student."""
        where = f"student {self.student_name!r}"
        if not isinstance(out, StudentOutput):
            raise PluginError(f"{where}: forward returned {type(out).__name__}, not a StudentOutput")
        d, k = self.student.embed_dim, max(self.summary_slots.values(), default=-1) + 1
        grid = out.grid
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
            raise PluginError(f"{where}: grid is {grid!r:.60}, not (h, w) positive integers")
        for part, t, shape in (("summary", out.summary, (batch, None, d)), ("patches", out.patches,
                                                                           (batch, grid[0] * grid[1], d))):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                what = type(t).__name__ if not isinstance(t, Tensor) else str(t.dtype).removeprefix("torch.")
                raise PluginError(f"{where}: {part} output is {what}, not a floating-point tensor")
            if t.dim() != 3 or any(e is not None and g != e for g, e in zip(t.shape, shape)) or \
                    (part == "summary" and t.shape[1] < k):
                want = f"({batch}, >= {k}, embed_dim={d})" if part == "summary" else \
                    f"({batch}, {grid[0]}*{grid[1]} patches of the {grid[0]}x{grid[1]} grid, embed_dim={d})"
                raise PluginError(f"{where}: {part} output has shape {tuple(t.shape)}; expected {want}")
        for layer, t in out.intermediates.items():
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(out.patches.shape):
                raise PluginError(f"{where}: intermediate layer {layer} has shape "
                                  f"{tuple(getattr(t, 'shape', ()))}; expected {tuple(out.patches.shape)}")
        if out.patches.is_meta:  # a dry run's forward on the meta device: shapes only
            return
        finite = all_finite(out.summary, out.patches)
        self.last_output_finite = finite
        if not self._checked_finite:
            self._checked_finite = True
            if not bool(finite):
                bad = int((~torch.isfinite(out.patches)).sum()) + int((~torch.isfinite(out.summary)).sum())
                raise PluginError(f"{where}: its outputs hold {bad} non-finite value(s) on the first batch; check "
                                  "its weights (student.args.pretrained) and its forward")

    def predict(self, out: StudentOutput, teacher: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Adaptor outputs for one teacher: summary (B, D) and spatial (B, C, h, w)."""
        summary = spatial = None
        if teacher in self.summary_heads:
            summary = self.summary_heads[teacher](out.summary[:, self.summary_slots[teacher]])
        if teacher in self.spatial_heads:
            b = out.patches.shape[0]
            h, w = out.grid
            layer = self.spatial_layers.get(teacher)
            tokens = out.patches if layer is None else out.intermediates[layer]
            spatial = self.spatial_heads[teacher](tokens).transpose(1, 2).reshape(b, -1, h, w)
        return summary, spatial

    def normalize_targets(self, teacher: str, target: TeacherOutput) -> TeacherOutput:
        if teacher not in self.target_norms:
            return target
        norms = self.target_norms[teacher]
        summary, spatial = target.summary, target.spatial
        if summary is not None and "summary" in norms:
            summary = norms["summary"].normalize_summary(summary)
        if "spatial" in norms:
            spatial = norms["spatial"].normalize_spatial(spatial)
        return TeacherOutput(summary=summary, spatial=spatial)

    def denormalize_predictions(self, teacher: str, summary: Optional[Tensor], spatial: Optional[Tensor]):
        """Head outputs mapped back to the teacher's true feature space."""
        if teacher not in self.target_norms:
            return summary, spatial
        norms = self.target_norms[teacher]
        if summary is not None and "summary" in norms:
            summary = norms["summary"].denormalize(summary)
        if spatial is not None and "spatial" in norms:
            spatial = norms["spatial"].denormalize(spatial.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return summary, spatial


def all_finite(*tensors: Tensor) -> Tensor:
    """0-d bool tensor, no host sync: every value of ``tensors`` is finite. One min/max pass per
    tensor (a NaN reaches both, an infinity one of them) instead of isfinite's several."""
    ends = [e.detach().float().reshape(1) for t in tensors if t.numel() for e in torch.aminmax(t.detach())]
    return torch.isfinite(torch.cat(ends)).all() if ends else torch.ones((), dtype=torch.bool)


def build_distiller(recipe: "Recipe", dims: dict[str, tuple[Optional[int], int]], registry: Registry, *,
                    losses: bool = False, cached: Collection[str] = (), adapters: bool = True) -> Distiller:
    """Student + heads for every teacher of every stage (``dims``: name -> (summary, spatial));
    with ``losses``, also each teacher's loss modules (training: ``cached`` names the teachers
    read from the feature cache, which shifted views cannot use). A recipe that starts from a
    released model (``student.init``) freezes what it does not train (``set_trainable``); its
    weights are loaded by ``radio_core.formats.release.load_release_weights``."""
    heads = [HeadSpec(name,
                      summary if recipe.teachers[name].use_summary else None,
                      spatial if recipe.teachers[name].use_spatial else None,
                      recipe.teachers[name].student_layer)
             for name, (summary, spatial) in dims.items()]
    for h in heads:
        if h.summary_dim is None and h.spatial_dim is None:
            raise PluginError(f"teachers.{h.name}: nothing to learn: plugin {recipe.teachers[h.name].plugin!r} gives "
                              "no summary target and use_spatial is false")
    num_cls = max(1, sum(h.summary_dim is not None for h in heads))
    try:
        student = registry.build("student", recipe.student.name, **recipe.student.args, num_cls_tokens=num_cls)
    except PluginError as exc:
        raise PluginError(f"student: {exc}") from None
    hidden = max(d for h in heads for d in (h.summary_dim, h.spatial_dim) if d is not None)
    summary_heads, spatial_heads = {}, {}
    for h in heads:
        teacher = recipe.teachers[h.name]
        for kind, dim, table in (("summary", h.summary_dim, summary_heads), ("spatial", h.spatial_dim, spatial_heads)):
            if dim is not None:
                spec = getattr(teacher, f"{kind}_adaptor") or teacher.adaptor or recipe.adaptor
                table[h.name] = registry.build("adaptor", spec.name, in_dim=student.embed_dim, out_dim=dim,
                                               **{"hidden_dim": hidden, **spec.args})
    norms = {}
    for h in heads:
        kind = recipe.teachers[h.name].target_norm
        kinds = kind if isinstance(kind, dict) else {"summary": kind, "spatial": kind}  # per part, or one for both
        parts = {part: build_target_norm(kinds.get(part, "none"), dim)
                 for part, dim in (("summary", h.summary_dim), ("spatial", h.spatial_dim))
                 if dim and kinds.get(part, "none") != "none"}
        if parts:
            norms[h.name] = torch.nn.ModuleDict(parts)
    loss_modules = build_losses(recipe, registry, set(cached)) if losses else None
    distiller = Distiller(student, heads, summary_heads, spatial_heads, norms, loss_modules)
    distiller.student_name = recipe.student.name
    if recipe.student.init is not None:
        set_trainable(distiller, recipe.student.init, adapters=adapters)
    return distiller


def set_trainable(distiller: Distiller, init, adapters: bool = True) -> None:
    """What a run started from a released model trains (``student.init.train``): everything; the
    heads (backbone frozen); the new teachers' heads only (``init.teachers`` names the reused
    ones); or LoRA adapters on the backbone (peft), and the heads. ``adapters=False`` builds the
    structure without the adapters (to load an export, where they are merged)."""
    if init.train == "all":
        return
    if init.train == "lora" and adapters:
        from .lora import apply_lora

        apply_lora(distiller.student, init.lora)  # the base layers frozen, the adapters trainable
    else:
        distiller.student.requires_grad_(False)
    if init.train == "new_heads":
        for name in init.teachers:
            for table in (distiller.summary_heads, distiller.spatial_heads):
                if name in table:
                    table[name].requires_grad_(False)


