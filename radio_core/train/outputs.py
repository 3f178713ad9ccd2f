"""What a run produces besides checkpoints: the full trained module (gathered under FSDP),
fidelity during training, the report, and the export with its model card. Each takes the
Trainer and is called on every rank (the collectives inside stay matched)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..models.distiller import Distiller, build_distiller
from .compiled import eager


def full_model(trainer: Any) -> Optional[Distiller]:
    """The trained module with all its weights, on the main process (None elsewhere). Under
    FSDP the shards are gathered into a fresh replica: every rank must call this."""
    acc = trainer.accelerator
    if not trainer.sharded:
        return trainer.unwrapped if acc.is_main_process else None
    state = acc.get_state_dict(trainer.distiller)  # a collective; the full dict lands on rank 0
    if not acc.is_main_process:
        return None
    replica = build_distiller(trainer.recipe, trainer._dims, trainer.registry)
    replica.load_state_dict(state)
    return replica.to(acc.device).train()


def evaluate_fidelity(trainer: Any) -> dict[str, float]:
    """Fidelity of every head whose teacher runs on the main process (``eval.every``)."""
    acc = trainer.accelerator
    out: dict[str, float] = {}
    model = trainer.full_model()
    if acc.is_main_process and trainer.teachers:
        from ..eval.training import fidelity_metrics

        with eager():  # (train.compile: eval mode and these resolutions would each compile)
            out = fidelity_metrics(trainer.out_dir, trainer.recipe, model, trainer.teachers)
        trainer.distiller.train()
    acc.wait_for_everyone()
    return out


def write_report(trainer: Any) -> Optional[Path]:
    acc = trainer.accelerator
    path = None
    model = trainer.full_model()
    if acc.is_main_process:
        from ..eval.training import write_run_report

        with eager():
            path = write_run_report(trainer.out_dir, trainer.recipe, model, trainer.teachers)
        acc.print(f"report written to {path}")
    acc.wait_for_everyone()
    return path


def export(trainer: Any, path: Path) -> Path:
    """Standalone student + adaptors (safetensors) with the config needed to rebuild them."""
    from ..formats.export import save_export
    from ..formats.model_card import write_model_card

    acc = trainer.accelerator
    acc.wait_for_everyone()
    model = trainer.full_model()  # under FSDP: gathered from the shards
    if acc.is_main_process:
        with eager():
            save_export(model, trainer.recipe, trainer.teachers, path)
        write_model_card(path, json.loads((path / "config.json").read_text()), trainer.out_dir)
    acc.wait_for_everyone()
    return path
