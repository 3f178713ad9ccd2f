"""Per-model input preparation from the shared augmented crop.

The loader yields one uint8 crop per image; every model's input is derived from it here, once
per group of teachers sharing a (size, resize mode), so the student and all teachers see the
same augmentation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def covering_size(*size_lists: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The smallest (H, W) at least as large as every given size: the shared crop every model's
    input is resized from."""
    sizes = [tuple(s) for sizes in size_lists for s in sizes]
    return (max(s[0] for s in sizes), max(s[1] for s in sizes))


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1] (floats pass through)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of [0, 1] images; a no-op at the same size. (No clamp: every
    output is a weighted mean of inputs with non-negative weights, so it stays in [0, 1].)"""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def longest_side_size(hw: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size after resizing so the image fits ``target`` with its aspect ratio kept (SAM)."""
    scale = min(target[0] / hw[0], target[1] / hw[1])
    return (max(1, int(round(hw[0] * scale))), max(1, int(round(hw[1] * scale))))


@dataclass
class GroupInput:
    """The resized images of one teacher group, before per-teacher normalisation."""

    images: Tensor  # (B, 3, h, w) in [0, 1]; for longest_side_pad, unpadded
    input_size: tuple[int, int]
    resize_mode: str

    @property
    def valid_fraction(self) -> tuple[float, float]:
        h, w = self.images.shape[-2:]
        return (h / self.input_size[0], w / self.input_size[1])


def group_input(images01: Tensor, input_size: tuple[int, int], resize_mode: str) -> GroupInput:
    if resize_mode == "resize":
        return GroupInput(resize(images01, input_size), input_size, resize_mode)
    if resize_mode == "longest_side_pad":
        size = longest_side_size(tuple(images01.shape[-2:]), input_size)
        return GroupInput(resize(images01, size), input_size, resize_mode)
    raise ValueError(f"unknown resize_mode {resize_mode!r} (expected 'resize' or 'longest_side_pad')")


def normalize(images01: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m, s = _constants(tuple(map(float, mean)), tuple(map(float, std)), images01.dtype, images01.device)
    return (images01 - m) / s


@functools.lru_cache(maxsize=64)
def _constants(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
               device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std as (1, C, 1, 1) tensors, made once per model and device rather
    than copied to the device on every step."""
    return (torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1))


def teacher_input(group: GroupInput, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalise, then (for longest_side_pad) zero-pad bottom/right to the input size, as SAM does."""
    x = normalize(group.images, mean, std)
    if group.resize_mode == "longest_side_pad":
        ph, pw = group.input_size[0] - x.shape[-2], group.input_size[1] - x.shape[-1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
    return x


def crop_valid(spatial: Tensor, valid_fraction: tuple[float, float]) -> Tensor:
    """Drop the feature-grid cells that only saw padding."""
    if valid_fraction == (1.0, 1.0):
        return spatial
    h, w = spatial.shape[-2:]
    vh, vw = max(1, math.ceil(h * valid_fraction[0] - 1e-6)), max(1, math.ceil(w * valid_fraction[1] - 1e-6))
    return spatial[..., :vh, :vw]
