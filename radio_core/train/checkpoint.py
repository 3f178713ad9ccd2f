"""Checkpoints: atomic save, pruning, and loading the newest loadable one.

A checkpoint is ``accelerator.save_state`` (safetensors model; optimiser and RNG loaded with
``weights_only=True``) plus ``trainer_state.json`` (the trainer's counters and the LR
scheduler's state: Accelerate would unpickle a registered scheduler, and a checkpoint must never
be able to run code).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..formats.checkpoints import CHECKPOINT_PREFIX, STATE_FILE, list_checkpoints


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs (saved as JSON in the checkpoint)."""

    step: int = 0  # optimiser steps completed
    samples_seen: int = 0  # global, all ranks
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    bad_images: int = 0  # over all ranks
    #: global number of the next sample to draw (lets a run resume on another world size).
    next_number: int = 0
    world_size: int = 1

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if hasattr(self, k):
                setattr(self, k, v)


class Checkpointer:
    """Writes ``ckpt_dir/step_NNNNNNNN`` atomically (temp dir + rename) and keeps the newest ``keep``."""

    def __init__(self, accelerator: Any, ckpt_dir: Path, keep: int) -> None:
        self.accelerator, self.ckpt_dir, self.keep = accelerator, Path(ckpt_dir), keep

    def save(self, state: TrainerState, scheduler: Any, recipe_steps: int,
             on_saved: Optional[Callable[[Path], None]] = None) -> Path:
        acc = self.accelerator
        final = self.ckpt_dir / f"{CHECKPOINT_PREFIX}{state.step:08d}"
        tmp = self.ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{state.step:08d}"
        if acc.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        # save_state has no barrier at its end: every rank writes its own RNG file into tmp, and
        # the main process must not rename tmp before the slowest rank has (seen on a loaded machine).
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"trainer": state.state_dict(),
                                                      "scheduler": scheduler.state_dict(),
                                                      "recipe_steps": recipe_steps}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: a kill leaves either the old or the new directory
            self.prune()
            if on_saved is not None:
                on_saved(final)
        acc.wait_for_everyone()
        return final

    def prune(self) -> None:
        for old in list_checkpoints(self.ckpt_dir)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, state: TrainerState, scheduler: Any) -> Optional[tuple[Path, dict]]:
        """Load the newest loadable checkpoint into the prepared objects, ``state`` and
        ``scheduler``; a corrupt one is reported and the previous one tried.
        Returns (path, saved trainer_state.json) or None."""
        acc = self.accelerator
        for path in reversed(list_checkpoints(self.ckpt_dir)):
            try:
                saved = json.loads((path / STATE_FILE).read_text())
                acc.load_state(str(path))
                state.load_state_dict(saved["trainer"])
                scheduler.load_state_dict(saved["scheduler"])
            except Exception as exc:  # noqa: BLE001 - fall back to an older checkpoint
                acc.print(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {exc}); trying an older one")
                continue
            return path, saved
        return None
