"""Metric math: kNN classification (DINO protocol), mIoU, boundary F-score, feature fidelity."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Class scores (N_test, num_classes) by a cosine-similarity kNN with the weighted vote of
    DINO (Caron et al. 2021): each of the k nearest neighbours votes exp(sim / T) for its class."""
    train = F.normalize(train_feats.float(), dim=-1)
    test = F.normalize(test_feats.float(), dim=-1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=-1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=-1).indices == labels[:, None]).any(-1)
        out[f"top{k}"] = float(hit.float().mean())
    return out


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou(conf: Tensor) -> dict[str, float | list[float]]:
    """Mean intersection-over-union over classes that occur (in prediction or ground truth)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    iou = torch.where(present, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    return {"miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_acc": float(inter.sum() / conf.sum().clamp(min=1)), "per_class_iou": iou.tolist()}


def fidelity(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Cosine similarity (mean over vectors / grid cells) and relative MSE ||p - t||^2 / ||t||^2
    between an adaptor's output and the teacher's true features (grids matched already)."""
    if pred.dim() == 4:
        pred = pred.permute(0, 2, 3, 1).reshape(-1, pred.shape[1])
        target = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
    pred, target = pred.float(), target.float()
    cos = F.cosine_similarity(pred, target, dim=-1).mean()
    rel = ((pred - target) ** 2).sum() / (target**2).sum().clamp(min=1e-12)
    return {"cosine": float(cos), "rel_mse": float(rel)}


@torch.no_grad()
def boundary_f_score(probs: Tensor, target: Tensor, tolerance: int = 1,
                     thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> dict[str, float]:
    """Boundary F-measure (BSDS style, dataset-wide best fixed threshold): a predicted boundary
    pixel is correct when a true one lies within ``tolerance`` pixels (Chebyshev), and a true one
    is recalled when a predicted one does. probs (N, H, W) in [0, 1]; target (N, H, W) bool."""
    k = 2 * tolerance + 1
    target = target.bool()
    near_true = F.max_pool2d(target[:, None].float(), k, 1, tolerance)[:, 0] > 0
    best = {"boundary_f": 0.0, "precision": 0.0, "recall": 0.0, "threshold": thresholds[0]}
    n_true = float(target.sum())
    for th in thresholds:
        pred = probs >= th
        near_pred = F.max_pool2d(pred[:, None].float(), k, 1, tolerance)[:, 0] > 0
        n_pred = float(pred.sum())
        precision = float((pred & near_true).sum()) / max(n_pred, 1.0)
        recall = float((target & near_pred).sum()) / max(n_true, 1.0)
        f = 2 * precision * recall / max(precision + recall, 1e-12)
        if f > best["boundary_f"]:
            best = {"boundary_f": f, "precision": precision, "recall": recall, "threshold": th}
    return best
