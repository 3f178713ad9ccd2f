"""Running a distilled student (and its teachers) over images for evaluation."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..models import preprocess
from ..models.distiller import Distiller
from ..models.teachers import compute_targets
from ..protocols import Teacher, TeacherOutput


def center_crop_tensor(img: Image.Image, size: tuple[int, int]) -> Tensor:
    """Deterministic eval view: resize the short side, center-crop to ``size``; uint8 (3, H, W)."""
    h, w = size
    scale = max(h / img.height, w / img.width)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(new, Image.BICUBIC)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    img = img.crop((left, top, left + w, top + h))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def batches(images: Sequence[Image.Image], size: tuple[int, int], batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(images), batch_size):
        yield torch.stack([center_crop_tensor(im, size) for im in images[start:start + batch_size]])


def round_to_multiple(res: int, multiple: int) -> int:
    return max(multiple, int(round(res / multiple)) * multiple)


@torch.no_grad()
def student_forward(distiller: Distiller, images01: Tensor, resolution: tuple[int, int]):
    """Student output and every head's prediction (in the teachers' true spaces: a target
    normaliser's inverse is applied when the run trained against normalised targets)."""
    distiller.eval()
    x = preprocess.resize(images01, resolution)
    out, preds = distiller(x, return_predictions=True)
    true_space = {}
    for name, (summary, spatial) in preds.items():
        true_space[name] = distiller.denormalize_predictions(name, summary, spatial)
    return out, true_space


@torch.no_grad()
def teacher_forward(teachers: dict[str, Teacher], images01: Tensor) -> dict[str, TeacherOutput]:
    from ..models.teachers import group_teachers

    return compute_targets(teachers, group_teachers(teachers), images01)
