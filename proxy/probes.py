"""Linear probes solved exactly: ridge regression to one-hot (or 0/1) targets, the penalty chosen
by 5-fold cross-validation on the probe-fitting split, thresholds chosen on that split too.

Why closed form: an SGD probe stopped after a few epochs is a noisy instrument (refitting it
moves a score as much as changing the student's seed). The ridge solution is unique, so a probe
has no seed and nothing to converge: two fits on the same features give the same numbers, and
what remains of probe noise is the finite test set (bootstrapped by the caller).

Three read-outs, all linear in the features, both fit from sufficient statistics (X^T X, X^T Y,
|Y|^2 per fold) accumulated in chunks:

* ``class_probe``: summary vectors (N, D) -> class scores;
* ``segmentation_probe``: a 1x1 read-out of the feature grid whose logits are bilinearly
  upsampled to the masks (per image: logits = A F W, A the fixed interpolation matrix, so the
  normal equations are sum F^T (A^T A) F and sum F^T A^T Y);
* ``shuffle_segmentation_probe``: a pixel-shuffle read-out (each feature vector predicts the
  r x r pixels of its cell, with weights per sub-position): fine structure inside a cell.

Test-set noise: ``bootstrap_se`` and the segmentation probe's ``bootstrap_se`` resample the
test images (the same 200 resamples for every subject).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

FOLDS = 5
#: ridge penalties tried, in units of the mean diagonal of X^T X (scale-free).
PENALTIES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def fold_of(n: int, folds: int = FOLDS) -> Tensor:
    """Fold id of each of n samples: contiguous blocks (the split's order is already random)."""
    return torch.arange(n) * folds // max(n, 1)


@dataclass
class NormalEquations:
    """Per-fold sufficient statistics of a least-squares problem with a bias column."""

    dim: int
    outputs: int
    folds: int = FOLDS
    xtx: Tensor = field(init=False)
    xty: Tensor = field(init=False)
    yty: Tensor = field(init=False)

    def __post_init__(self) -> None:
        d = self.dim + 1
        self.xtx = torch.zeros(self.folds, d, d, dtype=torch.float64)
        self.xty = torch.zeros(self.folds, d, self.outputs, dtype=torch.float64)
        self.yty = torch.zeros(self.folds, dtype=torch.float64)

    def add(self, fold: int, xtx: Tensor, xty: Tensor, yty: float) -> None:
        self.xtx[fold] += xtx.double()
        self.xty[fold] += xty.double()
        self.yty[fold] += float(yty)

    def _solve(self, xtx: Tensor, xty: Tensor, penalty: float) -> Tensor:
        d = xtx.shape[0]
        scale = float(xtx.diagonal()[:-1].mean()) if d > 1 else 1.0
        reg = torch.full((d,), penalty * max(scale, 1e-12), dtype=xtx.dtype)
        reg[-1] = 0.0  # the bias is not penalised
        return torch.linalg.solve(xtx + torch.diag(reg), xty)

    def held_out_error(self, penalty: float) -> float:
        total_xtx, total_xty = self.xtx.sum(0), self.xty.sum(0)
        err = 0.0
        for f in range(self.folds):
            w = self._solve(total_xtx - self.xtx[f], total_xty - self.xty[f], penalty)
            err += float(self.yty[f] - 2 * (w * self.xty[f]).sum() + (w * (self.xtx[f] @ w)).sum())
        return err

    def fit(self) -> tuple[Tensor, float]:
        """Weights fit on every fold with the penalty of least held-out error, and that penalty."""
        errors = {p: self.held_out_error(p) for p in PENALTIES}
        penalty = min(errors, key=errors.get)
        return self._solve(self.xtx.sum(0), self.xty.sum(0), penalty).float(), penalty


def with_bias(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


class Standardiser:
    """Per-channel centring and scaling with the fitting split's statistics (the penalty then
    treats every channel alike)."""

    def __init__(self, x: Tensor, channel_dim: int) -> None:
        dims = [d for d in range(x.dim()) if d != channel_dim]
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        x = x.double()
        self.mean = x.mean(dims).view(shape).float()
        self.std = x.std(dims).clamp(min=1e-6).view(shape).float()

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float() - self.mean) / self.std


# --------------------------------------------------------------------------- classification


def class_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, classes: int) -> tuple[Tensor, dict]:
    """Class scores (N_test, classes) of a ridge probe on summary vectors; info on the fit."""
    norm = Standardiser(train_x, 1)
    x = with_bias(norm(train_x))
    y = F.one_hot(train_y.long(), classes).float()
    eq = NormalEquations(train_x.shape[1], classes)
    folds = fold_of(len(x))
    for f in range(FOLDS):
        sel = folds == f
        eq.add(f, x[sel].T @ x[sel], x[sel].T @ y[sel], float(y[sel].square().sum()))
    w, penalty = eq.fit()
    return with_bias(norm(test_x)) @ w, {"penalty": penalty}


def class_prior(masks: Tensor, classes: int) -> Tensor:
    return torch.bincount(masks.flatten().long(), minlength=classes).float().clamp(min=1) / masks.numel()


def balanced_argmax(scores: Tensor, prior: Tensor) -> Tensor:
    """Class per pixel from (N, K, H, W) least-squares scores, which estimate P(class | x):
    argmax P(class | x) / P(class), the decision that weighs every class alike. (Plain argmax
    lets a class covering 85% of the pixels absorb the rest, which flattens mIoU towards the
    floor for any features.)"""
    return (scores / prior.view(1, -1, 1, 1)).argmax(1)


# --------------------------------------------------------------------------- segmentation


def interpolation_matrix(grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """A (H*W, h*w) such that A @ values.flatten() is ``F.interpolate(values, size, bilinear)``."""
    h, w = grid
    basis = torch.eye(h * w).view(h * w, 1, h, w)
    return F.interpolate(basis, size=size, mode="bilinear", align_corners=False).view(h * w, -1).T.contiguous()


def segmentation_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, classes: int,
                       chunk: int = 64) -> dict:
    """mIoU of a linear read-out of feature grids (N, C, h, w) whose logits are bilinearly
    upsampled to the masks (N, H, W) of class ids."""
    norm = Standardiser(train_f, 1)
    grid, size = tuple(train_f.shape[-2:]), tuple(train_y.shape[-2:])
    a = interpolation_matrix(grid, size)  # (HW, hw)
    ata = a.T @ a
    eq = NormalEquations(train_f.shape[1], classes)
    folds = fold_of(len(train_f))

    def tokens(f: Tensor) -> Tensor:  # (B, hw, C+1)
        return with_bias(norm(f).flatten(2).transpose(1, 2))

    for i in range(0, len(train_f), chunk):
        x = tokens(train_f[i:i + chunk])
        y = F.one_hot(train_y[i:i + chunk].long().flatten(1), classes).float()  # (B, HW, K)
        ax = ata @ x  # (B, hw, C+1): A^T A F per image
        aty = a.T @ y  # (B, hw, K): A^T Y per image
        for f in folds[i:i + chunk].unique().tolist():
            sel = folds[i:i + chunk] == f
            xs = x[sel].flatten(0, 1)
            eq.add(f, xs.T @ ax[sel].flatten(0, 1), xs.T @ aty[sel].flatten(0, 1), float(y[sel].sum()))
    w, penalty = eq.fit()
    prior = class_prior(train_y, classes)
    per_image = []
    for i in range(0, len(test_f), chunk):
        logits = (tokens(test_f[i:i + chunk]) @ w).transpose(1, 2).reshape(-1, classes, *grid)
        pred = balanced_argmax(F.interpolate(logits, size=size, mode="bilinear", align_corners=False), prior)
        per_image.append(confusion_per_image(pred, test_y[i:i + chunk], classes))
    return {**_segmentation_result(torch.cat(per_image)), "penalty": penalty}


def confusion_per_image(pred: Tensor, target: Tensor, classes: int) -> Tensor:
    """(N, K, K) confusion matrices (row: true class, column: predicted), one per image, in one
    bincount (checked against torchmetrics' multiclass_confusion_matrix in the tests)."""
    n = len(pred)
    idx = (torch.arange(n).view(n, 1) * classes * classes + target.reshape(n, -1).long() * classes
           + pred.reshape(n, -1).long())
    return torch.bincount(idx.flatten(), minlength=n * classes * classes).view(n, classes, classes)


def miou_of(conf: Tensor, scored: Optional[list[int]] = None) -> tuple[float, list[float]]:
    """Mean IoU over the classes present in prediction or truth (of ``scored``, default all),
    and the per-class IoU (NaN where absent), from a (K, K) confusion matrix: torchmetrics'
    macro Jaccard index when every class is scored."""
    conf = conf.double()
    inter = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    keep = union > 0
    if scored is not None:
        keep &= torch.isin(torch.arange(len(iou)), torch.tensor(scored))
    return float(iou[keep].mean()), iou.tolist()


def _segmentation_result(confs: Tensor, scored: Optional[list[int]] = None) -> dict:
    """mIoU over the test images (of the ``scored`` classes) and its bootstrap standard error."""
    miou, per_class = miou_of(confs.sum(0), scored)
    resampled = torch.tensor([miou_of(confs[d].sum(0), scored)[0] for d in _bootstrap_indices(len(confs))])
    return {"miou": miou, "per_class_iou": per_class, "bootstrap_se": float(resampled.std())}


def shuffle_segmentation_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, classes: int,
                               chunk: int = 128, scored: Optional[list[int]] = None) -> dict:
    """mIoU of a linear pixel-shuffle read-out: each feature vector of the grid (N, C, h, w)
    predicts the class scores of the r x r pixels of its cell (its own weights per sub-position,
    r = mask size / grid size), so fine structure inside a cell can be read out where the
    features hold it. The masks' size must be a whole multiple of the grid."""
    grid, size = tuple(train_f.shape[-2:]), tuple(train_y.shape[-2:])
    if size[0] % grid[0] or size[1] % grid[1] or size[0] // grid[0] != size[1] // grid[1]:
        raise ValueError(f"shuffle probe: a {grid[0]}x{grid[1]} feature grid does not tile {size[0]}x{size[1]} masks")
    r = size[0] // grid[0]
    norm = Standardiser(train_f, 1)
    eq = NormalEquations(train_f.shape[1], classes * r * r)
    folds = fold_of(len(train_f))

    def tokens(f: Tensor) -> Tensor:  # (B * hw, C+1)
        return with_bias(norm(f).flatten(2).transpose(1, 2)).flatten(0, 1)

    for i in range(0, len(train_f), chunk):
        x = tokens(train_f[i:i + chunk]).view(-1, grid[0] * grid[1], train_f.shape[1] + 1)
        y = F.pixel_unshuffle(F.one_hot(train_y[i:i + chunk].long(), classes).permute(0, 3, 1, 2).float(), r)
        y = y.flatten(2).transpose(1, 2)  # (B, hw, K r^2)
        for f in folds[i:i + chunk].unique().tolist():
            sel = folds[i:i + chunk] == f
            xs, ys = x[sel].flatten(0, 1), y[sel].flatten(0, 1)
            eq.add(f, xs.T @ xs, xs.T @ ys, float(ys.sum()))
    w, penalty = eq.fit()
    prior = class_prior(train_y, classes)
    per_image = []
    for i in range(0, len(test_f), chunk):
        f = test_f[i:i + chunk]
        logits = (tokens(f) @ w).view(len(f), grid[0] * grid[1], -1).transpose(1, 2).reshape(len(f), -1, *grid)
        pred = balanced_argmax(F.pixel_shuffle(logits, r), prior)
        per_image.append(confusion_per_image(pred, test_y[i:i + chunk], classes))
    return {**_segmentation_result(torch.cat(per_image), scored), "penalty": penalty}


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, classes: int, k: int = 20) -> Tensor:
    """Per-test-image DINO-weighted kNN predictions (cosine, T = 0.07)."""
    from radio_core.eval import metrics

    return metrics.knn_predict(train_x, train_y, test_x, classes, k=k).argmax(1)


def _bootstrap_indices(n: int, draws: int = 200, seed: int = 0) -> Tensor:
    """Resamples of n test images (with replacement), the same for every subject."""
    return torch.randint(n, (draws, n), generator=torch.Generator().manual_seed(seed))


def bootstrap_se(correct: Tensor) -> float:
    """Standard error of a mean over test items by the bootstrap (test-set sampling noise)."""
    return float(correct.float()[_bootstrap_indices(len(correct))].mean(1).std())


__all__ = ["class_probe", "segmentation_probe", "shuffle_segmentation_probe", "knn_accuracy", "bootstrap_se", "interpolation_matrix", "PENALTIES",
           "FOLDS"]
