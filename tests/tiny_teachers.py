"""Shared helpers of the teacher tests: real pixels prepared the way the framework prepares a
teacher's input, and a strict max-abs-error comparison."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from radio_core.models.preprocess import group_input, teacher_input, to_float

#: fp32 agreement required between a plugin and its source library on the same pixels.
ATOL = 1e-5


def photos() -> Tensor:
    """Two real photographs shipped with scikit-image, as a uint8 (2, 3, 300, 300) batch."""
    from skimage import data

    crops = [data.astronaut()[100:400, 100:400], data.chelsea()[:, 75:375]]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def teacher_pixels(teacher, size: Sequence[int] | None = None) -> Tensor:
    """The photos resized to ``size`` (default: the teacher's input size) and normalised with
    the teacher's declared mean/std, exactly as the framework feeds a teacher."""
    size = tuple(size or teacher.input_size)
    group = group_input(to_float(photos()), size, "resize")
    return teacher_input(group, teacher.mean, teacher.std)


def assert_max_abs(actual: Tensor, expected: Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:g}"
    # Guard against vacuous agreement (e.g. all-zero features from an untrained init).
    assert expected.std().item() > 1e-2


def tokens_to_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, h*w, C) row-major tokens -> (B, C, h, w)."""
    b, n, c = tokens.shape
    assert n == grid[0] * grid[1], (n, grid)
    return tokens.transpose(1, 2).reshape(b, c, *grid)
