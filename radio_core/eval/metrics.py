"""Metric math: kNN classification (DINO protocol), mIoU, feature fidelity."""
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
