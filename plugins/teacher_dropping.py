"""Loss-driven teacher balancing (UNIC / DUNE "teacher dropping"), registered as balancer
``teacher_dropping``. Off unless a recipe names it (``balance: {name: teacher_dropping}``).

Why: with several teachers, the student drifts toward whichever teacher is easiest to imitate;
the teachers it already matches keep contributing gradient that competes with the ones it does
not. UNIC (Sariyildiz et al., ECCV 2024) and DUNE (CVPR 2025) regularise this by dropping, per
image, the loss terms of teachers the student already matches well, so that the teacher the
student is worst at always drives the update.

What: the framework computes each teacher's loss per image (the summary and spatial terms the
recipe weights) for the teachers that see that image (one slot), and calls
``weights = balancer(per_image_losses, generator)``. For every image the teacher with the
highest loss keeps weight 1; every other teacher is dropped (weight 0) with probability ``p``.
``mode: max_only`` keeps only the highest-loss teacher (``p = 1``). Weights are not rescaled
(as in UNIC: dropping lowers the average weight of the well-matched teachers on purpose).
A slot with one teacher is left alone. Randomness comes from the generator the framework seeds
by (seed, step, slot), so a resumed run drops the same teachers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from radio_core import hookimpl

PLUGIN = "teacher_dropping"
MODES = ("drop", "max_only")


class TeacherDropping:
    """Per-image weights (0 or 1) for the teachers of a slot; see the module docstring."""

    def __init__(self, p: float = 0.5, mode: str = "drop") -> None:
        if mode not in MODES:
            raise ValueError(f"balancer {PLUGIN}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"balancer {PLUGIN}: p must be in [0, 1], got {p}")
        self.p = 1.0 if mode == "max_only" else float(p)
        self.mode = mode

    def __call__(self, losses: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``losses``: teacher -> (B,) per-image loss (detached or not); returns teacher -> (B,)
        weights in {0, 1}."""
        names = list(losses)
        if len(names) < 2:
            return {n: torch.ones_like(losses[n]) for n in names}
        stacked = torch.stack([losses[n].detach().float() for n in names])  # (T, B)
        top = stacked.argmax(0)  # (B,) the teacher the student is worst at, per image
        keep = torch.rand(stacked.shape, generator=generator, device="cpu").to(stacked.device) >= self.p
        keep[top, torch.arange(stacked.shape[1], device=stacked.device)] = True
        weights = keep.to(stacked.dtype)
        return {n: weights[i] for i, n in enumerate(names)}

    def __repr__(self) -> str:
        return f"TeacherDropping(p={self.p}, mode={self.mode!r})"


def build_teacher_dropping(p: float = 0.5, mode: str = "drop") -> TeacherDropping:
    """Drop, per image, the loss of each teacher but the highest-loss one with probability p."""
    return TeacherDropping(p, mode)


@hookimpl
def radio_register(registry) -> None:
    registry.add("balancer", PLUGIN, build_teacher_dropping)


__all__ = ["TeacherDropping", "build_teacher_dropping"]
