"""Subjects of evaluation (``radio_core.protocols.Subject``): the run's student at one input
resolution, a teacher at its own, and baselines (raw pixels, a random-init student); and
``extract``, which runs a subject over a whole split with a progress bar and caches the
features by (subject fingerprint, resolution, data fingerprint, preprocessing)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..models import preprocess
from ..models.distiller import Distiller
from ..protocols import EvalData, Features, Subject, Teacher
from ..utils import module_fingerprint
from .features import center_crop_tensor, student_forward, teacher_forward

#: how an image becomes a subject's input: ``crop`` = resize the short side and center-crop
#: (classification), ``resize`` = the whole image resized (dense tasks, masks resized alike).
VIEWS = ("crop", "resize")


class StudentSubject(Subject):
    """The run's student at ``resolution``: ``summary`` is the backbone summary (its CLS tokens
    concatenated) and ``spatial`` the backbone's patch grid, or with ``head`` that adaptor
    head's summary / spatial prediction (in its teacher's space); ``embedding`` is the CLIP head's
    summary, matched with that teacher's text tower for zero-shot."""

    kind = "student"

    def __init__(self, distiller: Distiller, resolution: int | tuple[int, int], teachers: Optional[dict] = None,
                 head: Optional[str] = None, clip_head: Optional[str] = None, name: Optional[str] = None,
                 run: Any = None, kind: str = "student") -> None:
        res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        multiple = distiller.student.size_multiple
        self.resolution = tuple(max(multiple, round(r / multiple) * multiple) for r in res)
        self.distiller, self.teachers, self.head, self.run, self.kind = distiller, teachers or {}, head, run, kind
        if head is not None and head not in distiller.summary_heads and head not in getattr(distiller, "spatial_heads", {}):
            raise ValueError(f"--head {head!r}: the student has no adaptor head of that name "
                             f"(heads: {', '.join(distiller.summary_heads) or 'none'})")
        self.clip_head = clip_head if clip_head is not None else next(
            (n for n, t in self.teachers.items() if hasattr(t, "encode_text") and n in distiller.summary_heads), None)
        base = "student" if kind == "student" else "random"
        self.name = name or f"{base}@{self.resolution[0]}" + (f"/{head}" if head else "")
        self._fp: Optional[str] = None

    @torch.no_grad()
    def features(self, images: Tensor) -> Features:
        out, preds = student_forward(self.distiller, images, self.resolution)
        if self.head is None:
            summary, spatial = out.summary.flatten(1), out.spatial()
        else:
            summary, spatial = preds[self.head]
        embedding = preds[self.clip_head][0] if self.clip_head else None
        return Features(summary, spatial, embedding)

    def encode_text(self, prompts: Sequence[str]) -> Optional[Tensor]:
        teacher = self.teachers.get(self.clip_head) if self.clip_head else None
        return None if teacher is None else teacher.encode_text(list(prompts)).float()

    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = module_fingerprint(self.distiller, extra=("student", self.head, self.clip_head))
        return self._fp


class TeacherSubject(Subject):
    """A frozen teacher at its own input size (resized and normalised as in training); its
    summary is also its zero-shot embedding when it has a text tower."""

    kind = "teacher"

    def __init__(self, name: str, teacher: Teacher, run: Any = None) -> None:
        self.name, self.teacher, self.run = f"teacher/{name}", teacher, run
        self.resolution = tuple(teacher.input_size)

    @torch.no_grad()
    def features(self, images: Tensor) -> Features:
        target = teacher_forward({"t": self.teacher}, images)["t"]
        clip = target.summary if hasattr(self.teacher, "encode_text") else None
        return Features(target.summary, target.spatial, clip)

    def encode_text(self, prompts: Sequence[str]) -> Optional[Tensor]:
        if not hasattr(self.teacher, "encode_text"):
            return None
        return self.teacher.encode_text(list(prompts)).float()

    def fingerprint(self) -> str:
        return self.teacher.fingerprint()


class PixelSubject(Subject):
    """Raw pixels, the floor every learned feature should clear: ``spatial`` = the pixels of each
    ``patch`` x ``patch`` cell as one vector (what a linear patch embedding sees), ``summary`` =
    the image average-pooled to 8 x 8 x 3."""

    kind = "baseline"

    def __init__(self, resolution: int | tuple[int, int], patch: int = 16, run: Any = None) -> None:
        res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.run = run  # the run it stands beside (an evaluator may read its recipe)
        self.resolution = tuple(max(patch, r // patch * patch) for r in res)
        self.patch, self.name = patch, f"pixels@{self.resolution[0]}"

    def features(self, images: Tensor) -> Features:
        x = preprocess.resize(images, self.resolution)
        return Features(F.adaptive_avg_pool2d(x, 8).flatten(1), F.pixel_unshuffle(x, self.patch))

    def fingerprint(self) -> str:
        return f"pixels-{self.patch}"


def random_student(run: Any, resolution: int, seed: int = 0, head: Optional[str] = None) -> StudentSubject:
    """The run's student and heads, freshly initialised (seed ``seed``): what the architecture
    gives before any distillation."""
    from ..models.distiller import build_distiller
    from ..registry import get_registry

    if not run.dims:
        raise ValueError("a random-init baseline needs the run loaded by radio_core.eval.loading.load_run")
    dims = run.dims
    torch.manual_seed(seed)
    distiller = build_distiller(run.recipe, dims, get_registry()).eval()
    return StudentSubject(distiller, resolution, teachers=run.teachers, head=head, run=run, kind="baseline")


# --------------------------------------------------------------------------- feature extraction


def view(image: Image.Image, size: tuple[int, int], how: str) -> Tensor:
    """uint8 (3, H, W) input of ``size`` made from a PIL image: see ``VIEWS``."""
    if how == "crop":
        return center_crop_tensor(image, size)
    if how == "resize":
        img = image.resize((size[1], size[0]), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    raise ValueError(f"unknown view {how!r}; views are {', '.join(VIEWS)}")


def cache_key(subject: Subject, data: EvalData, split: str, how: str) -> str:
    blob = json.dumps({"subject": subject.fingerprint(), "resolution": list(subject.resolution),
                       "data": data.fingerprint, "split": split, "view": how, "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cat(parts: list[Optional[Tensor]]) -> Optional[Tensor]:
    return None if not parts or parts[0] is None else torch.cat([p.float().cpu() for p in parts])


@torch.no_grad()
def extract(subject: Subject, data: EvalData, split: str, how: str = "crop", batch_size: int = 32,
            cache_dir: Optional[Path] = None) -> Features:
    """``subject``'s features of every image of ``data.<split>`` (``train`` / ``test``), viewed
    ``how`` at the subject's resolution. With ``cache_dir``, read from / written to
    ``<key>.safetensors`` + ``<key>.json`` (never pickle), key = (subject fingerprint,
    resolution, data fingerprint, split, view)."""
    from ..progress import progress

    images = getattr(data, split).images
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(subject, data, split, how)}.safetensors"
        if path.is_file():
            from ..utils import read_safetensors

            saved = read_safetensors(path, "cached features")
            return Features(saved.get("summary"), saved.get("spatial"), saved.get("embedding"))
    parts: dict[str, list] = {"summary": [], "spatial": [], "embedding": []}
    bar = progress(total=len(images), desc=f"features {subject.name} {split}", unit="img")
    try:
        for start in range(0, len(images), batch_size):
            chunk = [images[i] for i in range(start, min(start + batch_size, len(images)))]
            x = preprocess.to_float(torch.stack([view(im, subject.resolution, how) for im in chunk]))
            f = subject.features(x)
            for key in parts:
                parts[key].append(getattr(f, key))
            bar.update(len(chunk))
    finally:
        bar.close()
    feats = Features(_cat(parts["summary"]), _cat(parts["spatial"]), _cat(parts["embedding"]))
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(feats, k).contiguous() for k in parts if getattr(feats, k) is not None}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(
            {"subject": subject.name, "fingerprint": subject.fingerprint(), "resolution": list(subject.resolution),
             "data": data.source, "data_fingerprint": data.fingerprint, "split": split, "view": how,
             "images": len(images), "tensors": {k: list(v.shape) for k, v in tensors.items()}}, indent=1) + "\n")
    return feats


__all__ = ["StudentSubject", "TeacherSubject", "PixelSubject", "random_student", "extract", "cache_key", "VIEWS"]
