"""Evaluation during and right after training: the two calls the training loop makes.

The loop hands over what it holds (run folder, recipe, the live distiller and teachers); this
module never imports the trainer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.distiller import Distiller
from ..protocols import Teacher
from .loading import LoadedRun


def _run(out_dir: Path, recipe: Any, distiller: Distiller, teachers: dict[str, Teacher]) -> LoadedRun:
    return LoadedRun(Path(out_dir), recipe, distiller, dict(teachers), Path(out_dir) / "export" / "model.safetensors")


def fidelity_metrics(out_dir: Path, recipe: Any, distiller: Distiller, teachers: dict[str, Teacher]) -> dict[str, float]:
    """Fidelity of every head whose teacher is given, on ``eval.source`` images at
    ``eval.resolutions`` (default: every student training resolution; keys fidelity/<res>/<teacher>/<head>/<metric>)."""
    from .report import eval_images
    from .tasks import fidelity

    run = _run(out_dir, recipe, distiller, teachers)
    res = recipe.eval.resolutions or list(dict.fromkeys(h for h, _ in recipe.student_resolutions()))
    results = fidelity(run.distiller, teachers, eval_images(run, recipe.eval.images), res)
    return {f"fidelity/{r}/{head}/{m}": v for r, row in results.items() for head, ms in row.items()
            for m, v in ms.items()}


def write_run_report(out_dir: Path, recipe: Any, distiller: Distiller, teachers: dict[str, Teacher]) -> Path:
    from .report import write_report

    return write_report(_run(out_dir, recipe, distiller, teachers))
