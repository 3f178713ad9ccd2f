"""Shifted views of a crop for shift-equivariant distillation (``augment.shift``).

With ``shift = s > 0`` the student and every teacher group look at their own window of each
sample's crop: a square fraction ``1 - s`` of the crop's sides, placed uniformly at random, so
two views are offset by up to ``s`` of the crop in each direction (continuous offsets: sub-patch
shifts included). Windows are cut and resized on the device in one batched
``torchvision.ops.roi_align`` (bilinear), and their boxes (fractions of the crop) are passed to
geometry-aware spatial losses as ``CropGeometry``. ``s = 0`` gives the whole crop to everyone
(the framework's default, no resampling).

Randomness comes from a CPU generator the caller seeds per (seed, step, slot, micro-step), so a
resumed run draws the same windows.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

#: the whole crop, as a (x0, y0, x1, y1) box of crop fractions
FULL = (0.0, 0.0, 1.0, 1.0)


def sample_windows(batch: int, shift: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """(B, 4) boxes (x0, y0, x1, y1) in crop fractions: side ``1 - shift`` at uniform offsets."""
    if not 0.0 <= shift < 1.0:
        raise ValueError(f"augment.shift must be in [0, 1), got {shift}")
    if shift == 0:
        return torch.tensor(FULL).expand(batch, 4).clone()
    offset = torch.rand(batch, 2, generator=generator) * shift
    return torch.cat([offset, offset + (1.0 - shift)], dim=1)


def cut_windows(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Each image's window ``boxes[i]`` (crop fractions) resampled to ``size`` (H, W), bilinear.
    Whole-crop boxes at the crop's own size return the images unchanged."""
    h, w = images.shape[-2:]
    # The boxes are drawn on the host, and the decisions below are host numbers: read them there
    # (boxes already on the device cost one sync here).
    host = boxes.detach().to("cpu", torch.float32)
    numbers = host.tolist()
    if tuple(size) == (h, w) and all(tuple(box) == FULL for box in numbers):
        return images
    from torchvision.ops import roi_align

    # One bilinear sample per output pixel when the window is not shrunk (a pixel-aligned 1:1
    # window is then an exact slice), else ceil(ratio) samples per axis: a box-filter
    # anti-aliasing like the framework's resize.
    shrink = max(max((x1 - x0) * w / size[1], (y1 - y0) * h / size[0]) for x0, y0, x1, y1 in numbers)
    ratio = max(1, math.ceil(shrink - 1e-6))
    index = torch.arange(images.shape[0], dtype=torch.float32)[:, None]
    rois = torch.cat([index, host * torch.tensor([w, h, w, h], dtype=torch.float32)], dim=1).to(images.device)
    out = roi_align(images.float(), rois, output_size=tuple(size), spatial_scale=1.0, sampling_ratio=ratio,
                    aligned=True)
    return out.to(images.dtype)


def window_size(crop: tuple[int, int], shift: float) -> tuple[int, int]:
    """Pixel size of a ``1 - shift`` window of a ``crop`` (H, W), at least 1."""
    return tuple(max(1, round(s * (1.0 - shift))) for s in crop)  # type: ignore[return-value]


__all__ = ["FULL", "cut_windows", "sample_windows", "window_size"]
