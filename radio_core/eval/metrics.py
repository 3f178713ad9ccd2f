"""Metric math: kNN classification (DINO protocol; torch, or faiss for large sets), top-k accuracy
and mIoU (torchmetrics), boundary F-score (ours: torchmetrics has no boundary metric), feature
fidelity. tests/test_eval_ladder.py checks each library metric against the hand-written one it
replaced, on fixed inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


#: from this many training vectors on, kNN searches with faiss (exact inner-product index, many
#: threads, no (N_test x N_train) matrix in memory); below, one torch matmul per chunk.
FAISS_FROM = 20000


def nearest(train: Tensor, test: Tensor, k: int, backend: str = "auto", chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(similarities, indices) of the ``k`` most cosine-similar training vectors of each test
    vector. ``backend``: ``torch`` (exact), ``faiss`` (exact ``IndexFlatIP``, for large sets) or
    ``auto`` (faiss from ``FAISS_FROM`` training vectors, when it is installed)."""
    train = F.normalize(train.float(), dim=-1)
    test = F.normalize(test.float(), dim=-1)
    k = min(k, train.shape[0])
    if backend == "auto":
        import importlib.util

        large = train.shape[0] >= FAISS_FROM and importlib.util.find_spec("faiss") is not None
        backend = "faiss" if large else "torch"
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(train.shape[1])
        index.add(train.cpu().numpy())
        sims, idx = index.search(test.cpu().numpy(), k)
        return torch.from_numpy(sims), torch.from_numpy(idx).long()
    if backend != "torch":
        raise ValueError(f"kNN backend must be auto, torch or faiss, got {backend!r}")
    sims, idx = [], []
    for start in range(0, test.shape[0], chunk):
        s, i = (test[start:start + chunk] @ train.T).topk(k, dim=-1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, backend: str = "auto") -> Tensor:
    """Class scores (N_test, num_classes) by a cosine-similarity kNN with the weighted vote of
    DINO (Caron et al. 2021): each of the k nearest neighbours votes exp(sim / T) for its class."""
    top_sim, top_idx = nearest(train_feats, test_feats, k, backend)
    votes = torch.zeros(top_sim.shape[0], num_classes)
    votes.scatter_add_(1, train_labels.cpu()[top_idx], (top_sim / temperature).exp())
    return votes


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (torchmetrics ``MulticlassAccuracy``, micro average) for each k, capped
    at the number of classes."""
    from torchmetrics.classification import MulticlassAccuracy

    n = scores.shape[1]
    return {f"top{k}": float(MulticlassAccuracy(n, top_k=min(k, n), average="micro")(scores.float(), labels.long()))
            for k in ks}


class SegmentationScores:
    """mIoU over the classes that occur (in prediction or ground truth; torchmetrics
    ``MulticlassJaccardIndex``, macro), pixel accuracy and per-class IoU (NaN for absent classes),
    accumulated batch by batch; pixels labelled ``ignore_index`` are left out."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.miou = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index)
        self.per_class = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index,
                                                zero_division=float("nan"))
        self.pixel_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index)

    def update(self, pred: Tensor, target: Tensor) -> None:
        for m in (self.miou, self.per_class, self.pixel_acc):
            m.update(pred.long(), target.long())

    def compute(self) -> dict[str, float | list[float]]:
        return {"miou": float(self.miou.compute()), "pixel_acc": float(self.pixel_acc.compute()),
                "per_class_iou": self.per_class.compute().tolist()}


def label_boundaries(labels: Tensor, ignore_index: int = 255) -> Tensor:
    """(N, H, W) label maps -> bool maps of pixels whose right or lower neighbour has another
    label (pixels next to ``ignore_index`` are not boundaries)."""
    edge = torch.zeros_like(labels, dtype=torch.bool)
    for a, b, sl in ((labels[:, :, 1:], labels[:, :, :-1], (slice(None), slice(None), slice(1, None))),
                     (labels[:, 1:], labels[:, :-1], (slice(None), slice(1, None)))):
        diff = (a != b) & (a != ignore_index) & (b != ignore_index)
        edge[sl] |= diff
    return edge


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
