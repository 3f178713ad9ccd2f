"""Evaluation building blocks that return plain dicts of numbers: fidelity of a trained
``Distiller``'s heads, and probes on frozen features (linear classification, segmentation,
boundaries) and zero-shot weights, shared by the evaluators (``evaluators``) and the proxy
benchmark."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..models import preprocess
from ..models.distiller import Distiller
from ..models.losses import match_grids
from ..progress import progress
from ..protocols import Teacher
from . import metrics
from .features import batches, round_to_multiple, student_forward, teacher_forward

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


# --------------------------------------------------------------------------- zero-shot

@torch.no_grad()
def zero_shot_weights(clip_teacher: Any, classnames: Sequence[str],
                      templates: Sequence[Any]) -> Tensor:
    """(classes, D) zero-shot classifier from a CLIP text tower (anything with ``encode_text``):
    per class, the normalised mean of its normalised prompt embeddings. ``templates``: format
    strings with ``{}`` or callables (open_clip's ``zero_shot_metadata`` templates)."""
    weights = []
    for name in classnames:
        prompts = [t(name) if callable(t) else t.format(name) for t in templates]
        emb = F.normalize(clip_teacher.encode_text(prompts).float(), dim=-1)
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


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


def segmentation_probe(ftr: Tensor, ytr: Tensor, fte: Tensor, yte: Tensor, num_classes: int, epochs: int = 20,
                       lr: float = 1e-2, batch_size: int = 8, ignore_index: int = 255, seed: int = 0,
                       return_predictions: bool = False) -> dict:
    """A linear (1x1 conv) head on frozen spatial features (N, C, h, w), logits bilinearly
    upsampled to the masks (N, H, W); cross-entropy on the training pair, mIoU on the test pair."""
    torch.manual_seed(seed)
    probe = torch.nn.Conv2d(ftr.shape[1], num_classes, 1)
    # Features standardised per channel with training statistics (a frozen BatchNorm, as usual).
    mu, sd = ftr.mean((0, 2, 3), keepdim=True), ftr.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad(), progress(epochs, "segmentation probe", "epoch") as bar:
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
            bar.update(1)
    scores = metrics.SegmentationScores(num_classes, ignore_index)
    boundaries, preds = ([], []), []
    with torch.no_grad():
        for i in range(0, len(fte), 64):
            logits = F.interpolate(probe((fte[i:i + 64] - mu) / sd), size=yte.shape[-2:], mode="bilinear",
                                   align_corners=False)
            pred = logits.argmax(1)
            preds.append(pred)
            scores.update(pred, yte[i:i + 64])
            ignored = yte[i:i + 64] == ignore_index  # no boundary is scored where the truth is unknown
            boundaries[0].append(metrics.label_boundaries(pred.masked_fill(ignored, ignore_index), ignore_index))
            boundaries[1].append(metrics.label_boundaries(yte[i:i + 64], ignore_index))
    result = scores.compute()
    if return_predictions:  # the predicted label maps (N, H, W), for checks
        result["predictions"] = torch.cat(preds)
    # the boundaries of the predicted segments against the true ones (1 px tolerance)
    bf = metrics.boundary_f_score(torch.cat(boundaries[0]).float(), torch.cat(boundaries[1]), thresholds=(0.5,))
    return {**result, "boundary_f": bf["boundary_f"]}


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
    with torch.enable_grad(), progress(epochs, "boundary probe", "epoch") as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(ftr))
            for i in range(0, len(ftr), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.binary_cross_entropy_with_logits(logits(ftr[idx]), btr[idx].float(), pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
            bar.update(1)
    with torch.no_grad():
        probs = torch.cat([logits(fte[i:i + 64]).sigmoid() for i in range(0, len(fte), 64)])
    return metrics.boundary_f_score(probs, bte.bool(), tolerance=tolerance)
