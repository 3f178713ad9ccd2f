"""Shift-equivariant spatial loss (C-RADIOv4), registered as loss ``shift_equivariant``.

Why: ViT teachers carry fixed-position artefacts (high-norm tokens, position-embedding
patterns) that are tied to the token grid, not to the image. When the student and a teacher see
exactly the same view, the cheapest way to lower the spatial loss is to learn those artefacts
too. If the two views are shifted against each other by a random, sub-patch-precise offset, a
grid-locked artefact of the teacher lands on different image content every step, and only what
moves with the image (its content) can be matched: the student learns features that are
equivariant to shifts.

How: the framework gives the student and each teacher group its own window of the sample's
crop (``augment.shift``: windows of ``1 - shift`` of the crop side at independent random
offsets, so views differ by up to ``shift`` of the crop) and passes their boxes as
``CropGeometry``. This loss resamples both feature grids on the *overlap* of the two windows
(``torchvision.ops.roi_align``, bilinear, one sample per bin: with no shift this is exactly the
framework's "interpolate to the larger grid"), on a lattice as fine as the finer grid, and
applies the ``base`` loss there. Gradients flow into the prediction through the resampling.

Recipe::

    augment: {shift: 0.125}
    teachers:
      dino:
        spatial_loss: {name: shift_equivariant, args: {base: {name: cosine_smooth_l1}}}
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from radio_core import CropGeometry, Loss, get_registry, hookimpl

PLUGIN = "shift_equivariant"


def overlap_boxes(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample intersection of (B, 4) boxes (x0, y0, x1, y1); refuses empty overlaps."""
    o = torch.cat([torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])], dim=1)
    if bool(((o[:, 2:] - o[:, :2]) <= 0).any()):
        raise ValueError(f"loss {PLUGIN}: a student view and a teacher view do not overlap; use a smaller "
                         "augment.shift")
    return o


def resample_region(grid: Tensor, view: Tensor, region: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear samples of a (B, C, h, w) feature grid that covers ``view`` (B, 4 crop fractions)
    at the centres of a ``size`` lattice over ``region`` (B, 4 crop fractions)."""
    from torchvision.ops import roi_align

    b, _, h, w = grid.shape
    view, region = view.to(grid.device), region.to(grid.device)
    scale = torch.stack([w / (view[:, 2] - view[:, 0]), h / (view[:, 3] - view[:, 1])], dim=1)  # cells per unit
    lo = (region[:, :2] - view[:, :2]) * scale
    hi = (region[:, 2:] - view[:, :2]) * scale
    boxes = torch.cat([torch.arange(b, device=grid.device, dtype=grid.dtype)[:, None],
                       lo.to(grid.dtype), hi.to(grid.dtype)], dim=1)
    return roi_align(grid, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=1, aligned=True)


def align_on_overlap(pred: Tensor, target: Tensor, geometry: CropGeometry) -> tuple[Tensor, Tensor]:
    """Both grids resampled on the overlap of their views, on a lattice as fine as the finer of
    the two grids (cells per unit of crop), so neither side is downsampled."""
    # sizes and checks on the host (the framework passes the boxes on the CPU): no device sync
    student_box, teacher_box = (g.detach().cpu() for g in (geometry.student_box, geometry.teacher_box))
    region = overlap_boxes(student_box, teacher_box)
    extent = region[:, 2:] - region[:, :2]

    def cells(grid: Tensor, view: Tensor) -> Tensor:  # (B, 2) cells of this grid over the overlap (x, y)
        size = torch.tensor(grid.shape[-1:-3:-1], dtype=torch.float64)
        return extent.double() / (view[:, 2:] - view[:, :2]).double() * size

    n = torch.maximum(cells(pred, student_box), cells(target, teacher_box)).amax(0).tolist()
    size = (max(1, math.ceil(n[1] - 1e-6)), max(1, math.ceil(n[0] - 1e-6)))
    return (resample_region(pred, student_box.to(pred.dtype), region.to(pred.dtype), size),
            resample_region(target.to(pred.dtype), teacher_box.to(pred.dtype), region.to(pred.dtype), size))


class ShiftEquivariantLoss(Loss):
    """``base`` loss on the aligned overlap of the student's and the teacher's views."""

    wants_geometry = True

    def __init__(self, base: Loss) -> None:
        super().__init__()
        self.base = base

    def forward(self, pred: Tensor, target: Tensor, geometry: Optional[CropGeometry] = None) -> Tensor:
        if geometry is None:  # same view for both: the framework's rule (interpolate to the larger grid)
            b = pred.shape[0]
            full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(b, 4)
            geometry = CropGeometry(full, full)
        return self.base(*align_on_overlap(pred, target, geometry))


def build_shift_equivariant(base: Optional[dict[str, Any]] = None) -> ShiftEquivariantLoss:
    """Spatial loss compared on the aligned overlap of shifted student/teacher views.

    base: the loss applied there, ``{name: ..., args: {...}}`` (default AM-RADIO's
    ``cosine_smooth_l1``)."""
    spec = dict(base or {"name": "cosine_smooth_l1"})
    unknown = set(spec) - {"name", "args"}
    if unknown or "name" not in spec:
        raise ValueError(f"loss {PLUGIN}: base must be {{name: LOSS, args: {{...}}}}, got {base!r}")
    inner = get_registry().build("loss", spec["name"], **dict(spec.get("args") or {}))
    if getattr(inner, "wants_geometry", False):
        raise ValueError(f"loss {PLUGIN}: base loss {spec['name']!r} is itself geometry-aware")
    return ShiftEquivariantLoss(inner)


@hookimpl
def radio_register(registry) -> None:
    registry.add("loss", PLUGIN, build_shift_equivariant)


__all__ = ["ShiftEquivariantLoss", "align_on_overlap", "build_shift_equivariant", "overlap_boxes",
           "resample_region"]
