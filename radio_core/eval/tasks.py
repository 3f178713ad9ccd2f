"""Evaluation tasks. Each takes a trained ``Distiller`` (student + heads) and returns plain
dicts of numbers, so they serve the CLI, periodic evaluation during training, and sweeps."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..data.sources import IMAGE_EXTENSIONS, to_rgb
from ..models import preprocess
from ..models.distiller import Distiller
from ..models.losses import match_grids
from ..protocols import Teacher
from . import metrics
from .features import batches, round_to_multiple, student_forward, summary_features, teacher_forward

# --------------------------------------------------------------------------- fidelity


@torch.no_grad()
def fidelity(distiller: Distiller, teachers: dict[str, Teacher], images: Sequence[Image.Image],
             resolutions: Sequence[int], crop: Optional[tuple[int, int]] = None, batch_size: int = 8) -> dict:
    """Per resolution and teacher head: cosine similarity and relative MSE between the adaptor
    output and the teacher's true features on the same center crops (grids matched to the
    larger one, as in training). Teachers run at their own resolution."""
    multiple = distiller.student.size_multiple
    crop = crop or (max(max(t.input_size) for t in teachers.values()),) * 2
    results: dict[int, dict[str, dict[str, float]]] = {}
    targets_all = [teacher_forward(teachers, preprocess.to_float(u8)) for u8 in batches(images, crop, batch_size)]
    for res in resolutions:
        r = round_to_multiple(res, multiple)
        sums: dict[str, list[dict]] = {}
        for u8, targets in zip(batches(images, crop, batch_size), targets_all):
            _, preds = student_forward(distiller, preprocess.to_float(u8), (r, r))
            for name, target in targets.items():
                summary, spatial = preds[name]
                if summary is not None and target.summary is not None:
                    sums.setdefault(f"{name}/summary", []).append(metrics.fidelity(summary, target.summary))
                if spatial is not None:
                    p, t = match_grids(spatial, target.spatial)
                    sums.setdefault(f"{name}/spatial", []).append(metrics.fidelity(p, t))
        results[r] = {k: {m: float(np.mean([v[m] for v in vs])) for m in ("cosine", "rel_mse")}
                      for k, vs in sums.items()}
    return results


# --------------------------------------------------------------------------- labelled folders


def read_class_folder(root: str | Path, max_per_class: Optional[int] = None) -> tuple[list[Image.Image], list[int], list[str]]:
    """An image-folder dataset: one sub-folder per class (ImageNet layout)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: expected one sub-folder per class, found none")
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        for f in files[:max_per_class]:
            with Image.open(f) as im:
                im.load()  # read now: the file closes with the block
                images.append(to_rgb(im))
            labels.append(label)
    return images, labels, classes


@torch.no_grad()
def knn(distiller: Distiller, train: tuple[list, list], test: tuple[list, list], num_classes: int,
        resolution: tuple[int, int], head: Optional[str] = None, k: int = 20, batch_size: int = 32) -> dict:
    """DINO's weighted kNN (cosine, k=20, T=0.07) on summary features: top-1 / top-5."""
    tr = summary_features(distiller, batches(train[0], resolution, batch_size), resolution, head)
    te = summary_features(distiller, batches(test[0], resolution, batch_size), resolution, head)
    scores = metrics.knn_predict(tr, torch.tensor(train[1]), te, num_classes, k=k)
    return metrics.topk_accuracy(scores, torch.tensor(test[1]))


@torch.no_grad()
def teacher_knn(teacher: Teacher, train: tuple[list, list], test: tuple[list, list], num_classes: int,
                k: int = 20, batch_size: int = 32) -> dict:
    """The same kNN protocol on a teacher's own summary features (the reference to approach)."""
    def feats(images):
        out = [teacher_forward({"t": teacher}, preprocess.to_float(u8))["t"].summary
               for u8 in batches(images, tuple(teacher.input_size), batch_size)]
        return torch.cat(out)

    scores = metrics.knn_predict(feats(train[0]), torch.tensor(train[1]), feats(test[0]), num_classes, k=k)
    return metrics.topk_accuracy(scores, torch.tensor(test[1]))


# --------------------------------------------------------------------------- zero-shot

DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the large {}.",
                     "a photo of the small {}.", "a close-up photo of a {}.", "itap of a {}.")


@torch.no_grad()
def zero_shot_weights(clip_teacher: Any, classnames: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES) -> Tensor:
    """(classes, D) zero-shot classifier from a CLIP text tower: per class, the normalised mean
    of its normalised prompt embeddings."""
    weights = []
    for name in classnames:
        emb = F.normalize(clip_teacher.encode_text([t.format(name) for t in templates]).float(), dim=-1)
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zero_shot(distiller: Distiller, clip_teacher: Any, head: str, images: list, labels: list,
              classnames: Sequence[str], resolution: tuple[int, int],
              templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 32) -> dict:
    """Zero-shot classification through the student's CLIP summary head and the CLIP teacher's
    text tower: class embedding = mean of normalised prompt embeddings."""
    weights = zero_shot_weights(clip_teacher, classnames, templates)
    feats = F.normalize(summary_features(distiller, batches(images, resolution, batch_size), resolution, head), dim=-1)
    return metrics.topk_accuracy(feats @ weights.T, torch.tensor(labels))


def linear_probe_classification(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor,
                                test_labels: Tensor, num_classes: int, epochs: int = 100, lr: float = 1e-2,
                                weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """A linear classifier on frozen, standardised (training statistics) image features, trained
    full-batch with AdamW on cross-entropy; top-1 / top-5 on the test features."""
    mu, sd = train_feats.mean(0), train_feats.std(0).clamp(min=1e-6)
    xtr, xte = (train_feats.float() - mu) / sd, (test_feats.float() - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=gen)
        probe.bias.zero_()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            loss = F.cross_entropy(probe(xtr), train_labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return metrics.topk_accuracy(probe(xte), test_labels)


# --------------------------------------------------------------------------- segmentation


def read_segmentation_folder(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """ADE20K layout: ``images/<split>/*.jpg`` with ``annotations/<split>/*.png`` masks of the
    same stem (pixel value = class id; 255 = ignore)."""
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise FileNotFoundError(f"{root}: expected images/{split}/ and annotations/{split}/ (ADE20K layout)")
    pairs = []
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        mask = ann_dir / (img.stem + ".png")
        if not mask.is_file():
            raise FileNotFoundError(f"{img}: no mask {mask}")
        pairs.append((img, mask))
    return pairs


def _load_pair(img_path: Path, mask_path: Path, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    with Image.open(img_path) as im:
        img = to_rgb(im).resize((size[1], size[0]), Image.BICUBIC)
    with Image.open(mask_path) as m:
        mask = m.resize((size[1], size[0]), Image.NEAREST)
    return (torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1),
            torch.from_numpy(np.asarray(mask, dtype=np.int64).copy()))


@torch.no_grad()
def _spatial(distiller: Distiller, images_u8: Tensor, resolution: tuple[int, int], head: Optional[str]) -> Tensor:
    out, preds = student_forward(distiller, preprocess.to_float(images_u8), resolution)
    return out.spatial() if head is None else preds[head][1]


def reduce_zero(labels: Tensor, ignore_index: int = 255) -> Tensor:
    """ADE20K's convention: 0 ("other") -> ignore, 1..N -> 0..N-1, ignore stays ignore."""
    out = labels - 1
    out[(labels == 0) | (labels == ignore_index)] = ignore_index
    return out


def linear_probe_segmentation(distiller: Distiller, root: str | Path, num_classes: int,
                              resolution: tuple[int, int], head: Optional[str] = None, epochs: int = 20,
                              lr: float = 1e-2, batch_size: int = 8, ignore_index: int = 255,
                              seed: int = 0, reduce_zero_label: bool = False) -> dict:
    """A linear (1x1 conv) head on frozen spatial features, logits bilinearly upsampled to the
    mask, cross-entropy on ``training``, mIoU on ``validation``.

    Masks hold class ids, ``ignore_index`` = ignore. ``reduce_zero_label``: label 0 means
    "other" (ADE20K) and is ignored; labels 1..N become 0..N-1 (the benchmark's convention)."""
    train_pairs = read_segmentation_folder(root, "training")
    val_pairs = read_segmentation_folder(root, "validation")

    def load(pairs):
        xs, ys = zip(*(_load_pair(i, m, resolution) for i, m in pairs))
        return torch.stack(xs), torch.stack(ys)

    xtr, ytr = load(train_pairs)
    xva, yva = load(val_pairs)
    if reduce_zero_label:
        ytr, yva = (reduce_zero(y, ignore_index) for y in (ytr, yva))
    ftr = torch.cat([_spatial(distiller, xtr[i:i + batch_size], resolution, head) for i in range(0, len(xtr), batch_size)])
    fva = torch.cat([_spatial(distiller, xva[i:i + batch_size], resolution, head) for i in range(0, len(xva), batch_size)])
    result = segmentation_probe(ftr, ytr, fva, yva, num_classes, epochs=epochs, lr=lr, batch_size=batch_size,
                                ignore_index=ignore_index, seed=seed)
    return {**result, "train_images": len(train_pairs), "val_images": len(val_pairs)}


def segmentation_probe(ftr: Tensor, ytr: Tensor, fte: Tensor, yte: Tensor, num_classes: int, epochs: int = 20,
                       lr: float = 1e-2, batch_size: int = 8, ignore_index: int = 255, seed: int = 0) -> dict:
    """A linear (1x1 conv) head on frozen spatial features (N, C, h, w), logits bilinearly
    upsampled to the masks (N, H, W); cross-entropy on the training pair, mIoU on the test pair."""
    torch.manual_seed(seed)
    probe = torch.nn.Conv2d(ftr.shape[1], num_classes, 1)
    # Features standardised per channel with training statistics (a frozen BatchNorm, as usual).
    mu, sd = ftr.mean((0, 2, 3), keepdim=True), ftr.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(ftr))
            for i in range(0, len(ftr), batch_size):
                idx = perm[i:i + batch_size]
                logits = F.interpolate(probe((ftr[idx] - mu) / sd), size=ytr.shape[-2:], mode="bilinear",
                                       align_corners=False)
                loss = F.cross_entropy(logits, ytr[idx], ignore_index=ignore_index)
                opt.zero_grad()
                loss.backward()
                opt.step()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(fte), 64):
            logits = F.interpolate(probe((fte[i:i + 64] - mu) / sd), size=yte.shape[-2:], mode="bilinear",
                                   align_corners=False)
            conf += metrics.confusion_matrix(logits.argmax(1), yte[i:i + 64], num_classes, ignore_index)
    return metrics.miou(conf)


def boundary_probe(ftr: Tensor, btr: Tensor, fte: Tensor, bte: Tensor, epochs: int = 10, lr: float = 1e-2,
                   batch_size: int = 32, tolerance: int = 1, seed: int = 0) -> dict:
    """Fine boundaries from frozen spatial features (N, C, h, w) by a *linear* pixel-shuffle
    read-out: each feature vector predicts the r x r pixels of its cell (r = ceil(H / h); the
    logits are resized to the maps when r does not tile them). Trained with class-balanced
    binary cross-entropy on the training pair (boundary maps (N, H, W) of 0/1); on the test
    pair the boundary F-score (``metrics.boundary_f_score``) at the best fixed threshold."""
    size = tuple(btr.shape[-2:])
    r = -(-size[0] // ftr.shape[-2])
    torch.manual_seed(seed)
    probe = torch.nn.Conv2d(ftr.shape[1], r * r, 1)
    mu, sd = ftr.mean((0, 2, 3), keepdim=True), ftr.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
    share = max(float(btr.float().mean()), 1e-4)
    pos_weight = torch.tensor(min((1 - share) / share, 20.0) ** 0.5)

    def logits(f: Tensor) -> Tensor:
        out = F.pixel_shuffle(probe((f - mu) / sd), r)
        return (out if out.shape[-2:] == size else F.interpolate(out, size=size, mode="bilinear",
                                                                 align_corners=False))[:, 0]

    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(ftr))
            for i in range(0, len(ftr), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.binary_cross_entropy_with_logits(logits(ftr[idx]), btr[idx].float(), pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        probs = torch.cat([logits(fte[i:i + 64]).sigmoid() for i in range(0, len(fte), 64)])
    return metrics.boundary_f_score(probs, bte.bool(), tolerance=tolerance)
