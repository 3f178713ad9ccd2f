"""Learning-rate schedules as LambdaLR multipliers."""
from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float, name: str = "cosine") -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: Optimizer, multiplier: Callable[[int], float]) -> LambdaLR:
    """``multiplier(step)`` scales the base LR; the step count is saved with the checkpoint."""
    return LambdaLR(optimizer, multiplier)
