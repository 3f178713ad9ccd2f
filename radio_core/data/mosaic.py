"""Mosaic augmentation for a teacher group (``groups.NAME.mosaic: k``).

C-RADIOv4 (Ranzinger et al., 2026) distils SAM3 at 1152 px from mosaics of images, so that one
expensive high-resolution step carries several images, and the RADIO maintainers describe a
mosaic for SAM in RADIOv2.5's training (NVlabs/RADIO issue 175). We could not read the report's
exact layout; our scheme: every ``k`` x ``k`` consecutive images of a slot's batch (each its own
augmented crop) are shrunk to ``1/k`` of the crop's sides and laid out row-major into one canvas
the size of the crop. The canvas then goes through the ordinary pipeline: each teacher of the
group and the student get it resized to their own input size, so the student sees the same
mosaic as the teachers and their grids stay aligned cell for cell. A slot of ``B`` images makes
``B / k^2`` canvases (the recipe checks the divisibility); a canvas counts as unreadable when
any of its images is (it is left out of the losses).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..models import preprocess


def make_mosaic(images01: Tensor, k: int) -> Tensor:
    """(B, 3, H, W) [0, 1] crops -> (B / k^2, 3, k * (H // k), k * (W // k)) canvases: image
    ``c * k^2 + r * k + j`` fills row ``r``, column ``j`` of canvas ``c``."""
    b, ch, h, w = images01.shape
    if k < 1 or b % (k * k):
        raise ValueError(f"mosaic {k}x{k}: a batch of {b} images does not fill whole canvases")
    th, tw = h // k, w // k
    tiles = preprocess.resize(images01, (th, tw))
    return (tiles.reshape(b // (k * k), k, k, ch, th, tw).permute(0, 3, 1, 4, 2, 5)
            .reshape(b // (k * k), ch, k * th, k * tw))


def mosaic_valid(valid: Optional[Tensor], k: int) -> Optional[Tensor]:
    """A canvas is readable when all of its images are."""
    if valid is None:
        return None
    return valid.reshape(-1, k * k).all(dim=1)


def tile_box(k: int, index: int) -> tuple[float, float, float, float]:
    """Where image ``index`` (0 .. k^2 - 1) of a canvas lies: (x0, y0, x1, y1) fractions."""
    r, j = divmod(index, k)
    return (j / k, r / k, (j + 1) / k, (r + 1) / k)


__all__ = ["make_mosaic", "mosaic_valid", "tile_box"]
