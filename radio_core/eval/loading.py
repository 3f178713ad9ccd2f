"""Load a training run for evaluation: its recipe, teachers and trained student + heads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..models.distiller import Distiller
from ..protocols import Teacher
from ..recipe import Recipe, load_recipe
from ..registry import Registry, get_registry


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Recipe
    distiller: Distiller
    teachers: dict[str, Teacher]
    weights: Path
    #: teacher -> (summary dim or None, spatial dim): what the heads were built for
    dims: dict = field(default_factory=dict)


def latest_weights(run_dir: Path) -> Path:
    """The export if the run finished, else the newest complete checkpoint."""
    from ..formats.checkpoints import list_checkpoints

    export = run_dir / "export" / "model.safetensors"
    if export.is_file():
        return export
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if ckpts and (ckpts[-1] / "model.safetensors").is_file():
        return ckpts[-1] / "model.safetensors"
    raise FileNotFoundError(f"{run_dir}: no export/model.safetensors and no complete checkpoint")


def load_run(run_dir: str | Path, registry: Optional[Registry] = None, with_teachers: bool = True,
             device: str = "cpu") -> LoadedRun:
    """Rebuild the run's student, heads and (optionally) teachers from ``recipe.yaml`` and load
    the trained weights (safetensors: no code can run from the file)."""
    from ..models.distiller import build_distiller
    from ..models.teachers import build_teacher
    from ..utils import WeightsError, check_dtypes, read_safetensors

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no such directory)")
    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no recipe.yaml)")
    registry = registry or get_registry()
    recipe = load_recipe(run_dir / "recipe.yaml")
    teachers, dims = {}, {}
    for name in recipe.teachers:
        t = build_teacher(recipe, name, registry, meta=not with_teachers)
        dims[name] = (t.summary_dim, t.spatial_dim)
        if with_teachers:
            teachers[name] = t.to(device)
    weights = latest_weights(run_dir)
    state = read_safetensors(weights)
    torch.manual_seed(0)
    # LoRA adapters are in checkpoints, merged in exports
    distiller = build_distiller(recipe, dims, registry, adapters=any(".lora_A." in k for k in state))
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    # a checkpoint also holds the training losses' statistics: not part of the model
    state = {k: v for k, v in state.items() if not k.startswith("losses.")}
    check_dtypes(state, distiller.state_dict(), str(weights))
    try:
        missing, unexpected = distiller.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise WeightsError(f"{weights}: does not match the run's recipe: {detail}") from None
    if missing or unexpected:
        raise WeightsError(f"{weights}: does not match the run's recipe (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    return LoadedRun(run_dir, recipe, distiller.to(device).eval(), teachers, weights, dims)
