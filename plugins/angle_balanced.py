"""Angle-balanced summary loss (C-RADIOv4's "balanced summary loss"), registered as loss
``angle_balanced``.

Why: the cosine summary loss of AM-RADIO compares directions, but teachers spread their
summary vectors very differently. One whose embeddings all lie in a narrow cone (typical of
contrastive image towers: two unrelated images still have cosine ~0.8) gives small cosine
distances even to a poor prediction, so its loss, and its gradient, is small next to a teacher
whose embeddings spread over the sphere; the wide teacher dominates the summary. Scaling each
teacher's loss by its own measured angular dispersion puts every teacher's summary loss on the
same footing ("so no teacher dominates").

How (our reading of the report; the formula is not published): the dispersion of a teacher's
summary targets is estimated before training like the PHI-S statistics, from the same batches:
the mean resultant length ``R = |mean_i t_i/|t_i||`` of the unit target vectors (von Mises-Fisher
concentration statistic; ``R`` -> 1 for a narrow cone, -> 0 for a spread-out teacher). Then

* ``mode: cosine`` (default): ``loss = (1 - cos(p, t)) / (1 - R)``, the cosine distance in
  units of the targets' mean cosine distance to their mean direction, ``E[1 - cos(t, mu)]``;
* ``mode: angle``: ``loss = angle(p, t) / arccos(R)``, the angle in units of the typical angle
  between a target and the mean direction (the angle's gradient is clamped near 0).

The statistics are buffers (``resultant``, ``ready``) of the loss module, which the framework
keeps in the distiller, so checkpoints and resumes carry them. Estimate them in the space the
loss sees: with ``target_norm: phi_s`` (mean-centred targets) ``R`` is ~0 and the scale is ~1,
so combine this loss with ``target_norm: none`` or ``standardize`` for summaries.

Recipe::

    teachers:
      siglip2:
        summary_loss: {name: angle_balanced, args: {mode: cosine}}
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from radio_core import Loss, hookimpl

PLUGIN = "angle_balanced"
MODES = ("cosine", "angle")


class AngleBalancedLoss(Loss):
    """Summary loss divided by the teacher's measured angular dispersion (see the module doc)."""

    def __init__(self, mode: str = "cosine", min_dispersion: float = 1e-3, eps: float = 1e-6) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"loss {PLUGIN}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.min_dispersion, self.eps = mode, float(min_dispersion), float(eps)
        self.register_buffer("ready", torch.tensor(False))
        self.register_buffer("resultant", torch.zeros(()))
        self.register_buffer("_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self._sum: Tensor | None = None  # (D,) float64 sum of unit target vectors, sized on first use
        self._cached: tuple = (None, 0.0)  # (buffer versions, the divisor they give)

    # -- statistics (the framework's estimation pass) -------------------------------------
    @torch.no_grad()
    def observe(self, target: Tensor) -> None:
        """Accumulate unit target vectors (B, D)."""
        unit = F.normalize(target.detach().reshape(-1, target.shape[-1]).to(torch.float64), dim=-1, eps=self.eps)
        if self._sum is None:
            self._sum = torch.zeros(unit.shape[-1], dtype=torch.float64, device=unit.device)
        self._sum += unit.sum(0)
        self._count += unit.shape[0]

    @torch.no_grad()
    def all_reduce_(self, group=None) -> None:
        """Sum the running statistics over ranks (a no-op without a process group). Every rank
        takes part, also one that never ran this teacher (it contributes zeros)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._sum is None:
            raise RuntimeError(f"loss {PLUGIN}: all_reduce_ before any observe() on this rank; call "
                               "prepare_statistics(dim) on ranks that do not run the teacher")
        self._count = self._count.to(self._sum.device)
        dist.all_reduce(self._count, group=group)
        dist.all_reduce(self._sum, group=group)

    def prepare_statistics(self, dim: int, device=None) -> None:
        """Zero running sums of width ``dim`` (for ranks that observe nothing of this teacher)."""
        if self._sum is None:
            self._sum = torch.zeros(dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def finalize(self) -> None:
        n = float(self._count)
        if n < 2 or self._sum is None:
            raise RuntimeError(f"loss {PLUGIN}: need at least 2 summary targets to estimate the angular "
                               f"dispersion, got {int(n)}")
        self.resultant.fill_(float(self._sum.norm() / n))
        self.ready.fill_(True)

    def dispersion(self) -> float:
        """The divisor: ``1 - R`` (cosine mode) or ``arccos(R)`` (angle mode)."""
        r = min(max(float(self.resultant), 0.0), 1.0)
        value = 1.0 - r if self.mode == "cosine" else math.acos(r)
        return max(value, self.min_dispersion)

    # -- loss ---------------------------------------------------------------------------------
    def _divisor(self) -> float:
        """``dispersion()``, read from the buffers once per value they take (a write or a load
        bumps their versions) rather than on every step: each read waits for the device."""
        key = tuple((id(t), t._version) for t in (self.ready, self.resultant))
        if key != self._cached[0]:
            if not bool(self.ready):
                raise RuntimeError(f"loss {PLUGIN}: the angular dispersion is not estimated yet (the framework "
                                   "estimates it before the first step, with the target statistics)")
            self._cached = (key, self.dispersion())
        return self._cached[1]

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        divisor = self._divisor()
        if pred.shape != target.shape:
            raise ValueError(f"loss {PLUGIN} got prediction {tuple(pred.shape)} and target {tuple(target.shape)}")
        cos = F.cosine_similarity(pred.float().reshape(-1, pred.shape[-1]),
                                  target.float().reshape(-1, target.shape[-1]), dim=-1, eps=1e-8)
        if self.mode == "cosine":
            distance = 1.0 - cos
        else:
            distance = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        return distance.mean() / divisor

    def extra_repr(self) -> str:
        return f"mode={self.mode}, resultant={float(self.resultant):.4f}, ready={bool(self.ready)}"


def build_angle_balanced(mode: str = "cosine", min_dispersion: float = 1e-3) -> AngleBalancedLoss:
    """Cosine (or angle) summary loss scaled by the teacher's measured angular dispersion."""
    return AngleBalancedLoss(mode, min_dispersion)


@hookimpl
def radio_register(registry) -> None:
    registry.add("loss", PLUGIN, build_angle_balanced)


__all__ = ["AngleBalancedLoss", "build_angle_balanced"]
