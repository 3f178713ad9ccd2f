"""A run report: ``report.md`` with the run's numbers and pictures (PNG) side by side."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..models import preprocess
from .features import center_crop_tensor, round_to_multiple, student_forward, teacher_forward
from .loading import LoadedRun
from .pictures import pca_basis, pca_rgb, read_metrics, save_loss_curves, save_pca_figure, save_sweep_plot
from .tasks import fidelity


def eval_images(run: LoadedRun, count: int = 4) -> list:
    """Held-out images named by the recipe's ``eval.source`` (default: scikit-image photos)."""
    spec = run.recipe.eval.source
    from ..registry import get_registry

    source = get_registry().build("dataset", spec.name, **spec.args)
    return [source.load(i) for i in range(min(count, len(source)))]


@torch.no_grad()
def pca_figure(run: LoadedRun, image, path: Path, resolution: Optional[tuple[int, int]] = None) -> Path:
    """The input, the backbone's PCA map, each head's predicted map and each teacher's own map."""
    res = resolution or tuple(run.recipe.student.resolution[0])
    u8 = center_crop_tensor(image, res)[None]
    x = preprocess.to_float(u8)
    out, preds = student_forward(run.distiller, x, res)
    maps = {"student backbone": pca_rgb(out.spatial()[0])}
    targets = teacher_forward(run.teachers, x) if run.teachers else {}
    for name, (_, spatial) in preds.items():
        if spatial is None:
            continue
        if name in targets:  # the head is coloured with its teacher's PCA basis: same colours = same features
            target = targets[name].spatial[0]
            basis = pca_basis(target)
            maps[f"{name} head"] = pca_rgb(spatial[0], basis)
            maps[f"{name} teacher"] = pca_rgb(target, basis)
        else:
            maps[f"{name} head"] = pca_rgb(spatial[0])
    return save_pca_figure(u8[0].permute(1, 2, 0).numpy(), maps, path, title=f"PCA of features at {res[0]}x{res[1]}")


def fidelity_table(results: dict) -> str:
    heads = sorted({h for r in results.values() for h in r})
    lines = ["| resolution | " + " | ".join(f"{h} cos / relMSE" for h in heads) + " |",
             "|---|" + "---|" * len(heads)]
    for res, row in results.items():
        cells = [f"{row[h]['cosine']:.3f} / {row[h]['rel_mse']:.3f}" if h in row else "-" for h in heads]
        lines.append(f"| {res} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run: LoadedRun, out_dir: Optional[Path] = None, resolutions: Optional[Sequence[int]] = None,
                 images: int = 4) -> Path:
    out_dir = Path(out_dir or run.run_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    imgs = eval_images(run, images)
    train_res = tuple(run.recipe.student.resolution[0])
    multiple = run.distiller.student.size_multiple
    resolutions = list(resolutions or run.recipe.eval.resolutions
                       or dict.fromkeys(h for h, _ in run.recipe.student_resolutions()))
    results = fidelity(run.distiller, run.teachers, imgs, resolutions) if run.teachers else {}
    (out_dir / "fidelity.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    sections = [f"# Run report: `{run.run_dir}`", "",
                f"Weights: `{run.weights}`. Student `{run.recipe.student.name}` trained at "
                f"{train_res[0]}x{train_res[1]}; teachers: {', '.join(run.recipe.teachers)}.", ""]
    try:
        rows = read_metrics(run.run_dir)
        last = rows[-1]
        save_loss_curves(run.run_dir, out_dir / "loss_curves.png")
        sections += ["## Training", "",
                     f"{last['step']} steps, final total loss {last['loss/total']:.4f} "
                     f"(first logged: {rows[0]['loss/total']:.4f}); last measured throughput "
                     f"{last.get('images_per_s', float('nan')):.1f} images/s.", "",
                     "![loss curves](loss_curves.png)", ""]
    except (FileNotFoundError, IndexError, KeyError, TypeError, ValueError):
        pass  # no usable training log (missing, empty, or rows without losses): the section is left out
    if results:
        sections += ["## Fidelity to the teachers", "",
                     f"Cosine similarity and relative MSE of each adaptor head against its teacher on "
                     f"{len(imgs)} held-out center crops (`eval.source`), per student resolution.", "",
                     fidelity_table(results), ""]
        if len(results) > 1:
            series = {h: [results[r][h]["cosine"] for r in results] for h in next(iter(results.values()))}
            save_sweep_plot(list(results), series, out_dir / "resolution_sweep.png")
            sections += ["![resolution sweep](resolution_sweep.png)", ""]
    pca = pca_figure(run, imgs[0], out_dir / "pca.png", (round_to_multiple(train_res[0], multiple),) * 2)
    sections += ["## Features (PCA -> RGB)", "", "First three principal components of each feature map.", "",
                 f"![PCA]({pca.name})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(sections))
    return path


