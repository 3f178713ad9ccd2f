"""Pictures a person would rather look at than read: PCA feature maps, loss curves, sweeps."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display on training machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG and close (figures left open leak memory in long runs). The saved
    area grows to hold every title, label and annotation (``bbox_inches="tight"``): nothing is cut."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    pyplot().close(fig)
    return path


def pca_basis(spatial: Tensor) -> Tensor:
    """(C, h, w) -> (C, 3) top principal directions, to colour several maps the same way."""
    c = spatial.shape[0]
    x = spatial.float().reshape(c, -1).T
    _, _, v = torch.pca_lowrank(x - x.mean(0, keepdim=True), q=min(3, c), center=False)
    return v[:, :3]


def pca_rgb(spatial: Tensor, basis: Optional[Tensor] = None, out_size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """(C, h, w) features -> (h, w, 3) uint8: the first three principal components, each scaled
    to [0, 255] by its 1st-99th percentile. ``basis`` (C, 3) reuses a projection across images."""
    c, h, w = spatial.shape
    x = spatial.float().reshape(c, -1).T  # (hw, C)
    x = x - x.mean(0, keepdim=True)
    if basis is None:
        basis = pca_basis(spatial)
    proj = x @ basis
    if proj.shape[1] < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - proj.shape[1])], 1)
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)
    img = proj.reshape(h, w, 3)
    if out_size is not None:
        img = torch.nn.functional.interpolate(img.permute(2, 0, 1)[None], size=out_size, mode="nearest")[0].permute(1, 2, 0)
    return (img.numpy() * 255).astype(np.uint8)


def save_pca_figure(image: np.ndarray, maps: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Input image beside one PCA map per head / backbone."""
    plt = pyplot()
    n = 1 + len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2))
    axes = np.atleast_1d(axes)
    axes[0].imshow(image)
    axes[0].set_title("input")
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(m, interpolation="nearest")
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    from ..utils import read_user_jsonl

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return read_user_jsonl(path, "training log")  # malformed lines skipped; a FIFO or a device refused


def save_loss_curves(run_dir: str | Path, path: str | Path) -> Path:
    """One line per teacher head (and the total) against the step."""
    plt = pyplot()
    rows = read_metrics(run_dir)
    keys = sorted({k for r in rows for k in r if k.startswith("loss/")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if all(isinstance(r.get(f), (int, float)) for f in ("step", k))]
        if not pts:
            continue
        ax.plot(*zip(*pts), label=k[5:], linewidth=2.2 if k == "loss/total" else 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training losses per teacher")
    return save_figure(fig, path)


def save_sweep_plot(resolutions: Sequence[int], series: dict[str, Sequence[float]], path: str | Path,
                    ylabel: str = "cosine similarity to teacher", mark: Optional[int] = 720) -> Path:
    """Metric against student input resolution, one line per teacher head."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(resolutions, ys, marker="o", label=name)
    if mark is not None and min(resolutions) < mark < max(resolutions):
        ax.axvline(mark, color="grey", linestyle="--", linewidth=1)
        ax.text(mark, ax.get_ylim()[0], " ~720px: RADIO's mode switch", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("student input resolution (px)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("resolution sweep (mode-switching probe)")
    return save_figure(fig, path)
