"""Feature-matching losses and the grid matching rule of AM-RADIO."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from ..protocols import Loss
from ..recipe import RecipeError

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..registry import Registry


def _channels_last(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, h, w) grids -> (B*h*w, C); (B, D) vectors pass through."""
    if pred.shape != target.shape:
        raise ValueError(f"loss got prediction {tuple(pred.shape)} and target {tuple(target.shape)}")
    if pred.dim() == 4:
        c = pred.shape[1]
        return pred.permute(0, 2, 3, 1).reshape(-1, c), target.permute(0, 2, 3, 1).reshape(-1, c)
    return pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])


class CosineLoss(Loss):
    """Mean cosine distance 1 - cos(pred, target) over vectors (summary) or grid cells."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = _channels_last(pred.float(), target.float())
        return (1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-8)).mean()


class SmoothL1Loss(Loss):
    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = _channels_last(pred.float(), target.float())
        return F.smooth_l1_loss(p, t, beta=self.beta)


class MSELoss(Loss):
    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = _channels_last(pred.float(), target.float())
        return F.mse_loss(p, t)


class L1Loss(Loss):
    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = _channels_last(pred.float(), target.float())
        return F.l1_loss(p, t)


class CosineSmoothL1Loss(Loss):
    """AM-RADIO's spatial loss: ``cosine * L_cos + smooth_l1 * L_smoothL1``."""

    def __init__(self, cosine: float = 0.9, smooth_l1: float = 0.1, beta: float = 1.0) -> None:
        super().__init__()
        self.cosine_weight, self.smooth_l1_weight = cosine, smooth_l1
        self.cos, self.sl1 = CosineLoss(), SmoothL1Loss(beta)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.cosine_weight * self.cos(pred, target) + self.smooth_l1_weight * self.sl1(pred, target)


def match_grids(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinearly interpolate whichever (B, C, h, w) grid is smaller to the larger one.

    AM-RADIO compares student and teacher features on the *larger* of the two grids. "Larger"
    is decided by cell count; a grid larger in one axis and smaller in the other is resized
    to the elementwise maximum on both sides.
    """
    if pred.shape[-2:] == target.shape[-2:]:
        return pred, target
    size = (max(pred.shape[-2], target.shape[-2]), max(pred.shape[-1], target.shape[-1]))

    def resize(x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return resize(pred), resize(target)


def build_cosine() -> CosineLoss:
    """Cosine distance (AM-RADIO's summary loss)."""
    return CosineLoss()


def build_smooth_l1(beta: float = 1.0) -> SmoothL1Loss:
    """Smooth-L1 (Huber) distance.

    beta: where the loss turns from quadratic to linear.
    """
    return SmoothL1Loss(beta)


def build_mse() -> MSELoss:
    """Mean squared error."""
    return MSELoss()


def build_l1() -> L1Loss:
    """Mean absolute error."""
    return L1Loss()


def build_cosine_smooth_l1(cosine: float = 0.9, smooth_l1: float = 0.1, beta: float = 1.0) -> CosineSmoothL1Loss:
    """Weighted cosine + smooth-L1 (AM-RADIO's spatial loss).

    cosine: weight of the cosine distance. smooth_l1: weight of the smooth-L1 term. beta:
    smooth-L1's quadratic-to-linear point.
    """
    return CosineSmoothL1Loss(cosine, smooth_l1, beta)


def build_losses(recipe: "Recipe", registry: "Registry", cached: set[str]) -> dict[str, nn.ModuleDict]:
    """Each teacher's summary and spatial loss modules (they live in the distiller, so losses
    with statistics are checkpointed). With shifted views (``augment.shift``) every spatial
    loss must compare on the views' overlap, and no teacher may be read from the cache (its
    features were computed on the unshifted crop)."""
    shift = recipe.augment.shift
    if shift > 0 and cached:
        raise RecipeError(f"augment.shift is {shift:g} but teachers {sorted(cached)} are read from the feature "
                          "cache, whose features were computed on unshifted crops; run them online (cache.teachers) "
                          "or set augment.shift: 0")
    out = {}
    for name, spec in recipe.teachers.items():
        summary = registry.build("loss", spec.summary_loss.name, **spec.summary_loss.args)
        spatial = registry.build("loss", spec.spatial_loss.name, **spec.spatial_loss.args)
        if shift > 0 and spec.use_spatial and not getattr(spatial, "wants_geometry", False):
            base = spec.spatial_loss.name
            raise RecipeError(f"teachers.{name}.spatial_loss: augment.shift is {shift:g}, so student and teacher "
                              f"views differ, but loss {base!r} compares the grids cell by cell; use "
                              f"{{name: shift_equivariant, args: {{base: {{name: {base}}}}}}}")
        out[name] = nn.ModuleDict({"summary": summary, "spatial": spatial})
    return out
