"""Image corruptions for robustness evaluation: the same downstream scores on corrupted test
images (MESA and DAMP are robustness regularisers; they are judged on these).

Three corruptions of ImageNet-C (Hendrycks & Dietterich, ICLR 2019), each at severities 1-5
with the constants of its reference code (``make_imagenet_c.py``):

* ``gaussian_noise``: additive N(0, c^2) noise on [0, 1] pixels, c = .08 .12 .18 .26 .38;
* ``gaussian_blur``: Gaussian blur, sigma c = 1 2 3 4 6 pixels of a 224-px image;
* ``jpeg``: JPEG re-encoding at quality c = 25 18 15 10 7.

ImageNet-C's constants are for 224-px images. Our choice: blur sigma scales with the image's
shorter side (``sigma * side / 224``), so that a severity blurs the same share of the scene on
the proxy world's 64-128 px images; noise and JPEG quality are per pixel and unchanged. The work
is torchvision's ``gaussian_blur`` and PIL's JPEG codec (ImageNet-C's own); noise is drawn from a
generator seeded by the caller, so a corrupted test set is the same on every run.

    from radio_core.eval.corruptions import corrupt
    noisy = corrupt(images01, "gaussian_noise", severity=3, seed=0)   # (B, 3, H, W) in [0, 1]
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

#: ImageNet-C's parameter per severity 1..5.
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std on [0, 1] pixels
    "gaussian_blur": (1, 2, 3, 4, 6),  # sigma in pixels of a 224-px image
    "jpeg": (25, 18, 15, 10, 7),  # JPEG quality
}
REFERENCE_SIDE = 224


def gaussian_noise(images01: Tensor, c: float, generator: torch.Generator) -> Tensor:
    noise = torch.randn(images01.shape, generator=generator, dtype=torch.float32).to(images01)
    return (images01 + c * noise).clamp(0, 1)


def gaussian_blur(images01: Tensor, c: float, generator: torch.Generator) -> Tensor:
    from torchvision.transforms.functional import gaussian_blur as blur

    sigma = c * min(images01.shape[-2:]) / REFERENCE_SIDE
    kernel = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma, odd (torchvision needs an odd size)
    return blur(images01, [kernel, kernel], [sigma, sigma]).clamp(0, 1)


def jpeg(images01: Tensor, c: float, generator: torch.Generator) -> Tensor:
    import io

    import numpy as np
    from PIL import Image

    u8 = (images01.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = []
    for im in u8:  # PIL's encoder at ImageNet-C's quality, as its reference code does
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=int(c))
        decoded.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))))
    return (torch.stack(decoded).permute(0, 3, 1, 2).float() / 255).to(images01)


CORRUPTIONS: dict[str, Callable[[Tensor, float, torch.Generator], Tensor]] = {
    "gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur, "jpeg": jpeg,
}


def corrupt(images01: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """``images01`` (B, 3, H, W) floats in [0, 1] with corruption ``name`` at ``severity`` 1-5.
    Deterministic in ``seed`` (only the noise draws from it)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption {name!r} is not one of {', '.join(CORRUPTIONS)}")
    if not (isinstance(severity, int) and 1 <= severity <= 5):
        raise ValueError(f"corruption severity must be an integer 1-5, not {severity!r}")
    if images01.dim() != 4 or images01.shape[1] != 3:
        raise ValueError(f"corrupt expects (B, 3, H, W) images, got shape {tuple(images01.shape)}")
    generator = torch.Generator().manual_seed(seed)
    return CORRUPTIONS[name](images01, SEVERITIES[name][severity - 1], generator)


def corrupted_sets(images01: Tensor, severities: tuple[int, ...] = (1, 3, 5),
                   seed: int = 0) -> dict[str, Tensor]:
    """Every corruption at each of ``severities``, keyed ``name/severity`` (plus ``clean``): the
    test sets a robustness evaluation scores a model on."""
    out = {"clean": images01}
    for name in CORRUPTIONS:
        for s in severities:
            out[f"{name}/{s}"] = corrupt(images01, name, s, seed)
    return out
