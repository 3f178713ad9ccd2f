"""Checkpoints: atomic save with checksums, pruning of this run's own, loading the newest
loadable one, and the guard that keeps a new run out of an output_dir that holds one.

A checkpoint is ``accelerator.save_state`` (safetensors model; optimiser and RNG loaded with
``weights_only=True``) plus ``trainer_state.json`` (the trainer's counters, the LR scheduler's
state and the run id: Accelerate would unpickle a registered scheduler, and a checkpoint must
never be able to run code) plus ``checksums.json`` (verified on load).

Never lose a run: a resume that finds checkpoints but can load none raises ResumeError listing
each and why, before anything is written; pruning deletes only checkpoints of this run (same run
id) that loaded or that it wrote; a folder name it did not write is moved aside, never
overwritten; names that are not checkpoints are ignored.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..formats.checkpoints import (
    RUN_OUTPUTS,
    STATE_FILE,
    checkpoint_name,
    list_checkpoints,
    run_artifacts,
    trim_jsonl,
    verify_checksums,
    write_checksums,
)


class ResumeError(ValueError):
    """--resume found checkpoints but can use none of them; nothing was changed."""


class RunExistsError(ValueError):
    """A new run was asked for in an output_dir that already holds one."""


def check_new_run(out_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse a new run where a run lives unless ``overwrite``; True when outputs must be
    removed (by ``prepare_out_dir``, at the start of training)."""
    if resume and overwrite:
        raise RunExistsError("--resume and --overwrite contradict each other: choose one")
    found = [] if resume else run_artifacts(out_dir)
    if found and not overwrite:
        raise RunExistsError(f"output_dir {out_dir} already holds a run ({', '.join(found)}); continue it with "
                             "--resume, start over with --overwrite (removes that run's outputs), or choose "
                             "another output_dir")
    return bool(found)


def prepare_out_dir(out_dir: Path, step: int, remove_outputs: bool, say: Callable[[str], None]) -> None:
    """Main process, at the start of training: with --overwrite remove the earlier run's outputs
    (only those); cut the per-step logs back to ``step``, the step this run continues from, so
    that each step is logged once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if remove_outputs:
        for name in RUN_OUTPUTS:
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        for old in out_dir.glob("samples_rank*.jsonl"):
            old.unlink()
        say(f"--overwrite: removed the earlier run's outputs in {out_dir}")
    trim_jsonl(out_dir / "metrics.jsonl", step)
    for log in out_dir.glob("samples_rank*.jsonl"):
        trim_jsonl(log, step - 1)  # their rows hold the 0-based step being taken


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
    """Writes ``ckpt_dir/step_NNNNNNNN`` atomically (temp dir + rename, checksums inside) and
    keeps the newest ``keep`` of this run's checkpoints."""

    def __init__(self, accelerator: Any, ckpt_dir: Path, keep: int) -> None:
        self.accelerator, self.ckpt_dir, self.keep = accelerator, Path(ckpt_dir), keep
        #: identifies the run across resumes (adopted from the checkpoint a resume loads).
        self.run_id = uuid.uuid4().hex
        self.written: set[str] = set()  # checkpoint names this process wrote
        self.unloadable: set[str] = set()  # names a resume could not load: kept as they are

    def save(self, state: TrainerState, scheduler: Any, recipe_steps: int,
             on_saved: Optional[Callable[[Path], None]] = None,
             extra: Optional[Callable[[Path], None]] = None) -> Path:
        """``extra(directory)``: the main process writes further files (MESA's EMA) into the
        checkpoint before its checksums."""
        acc = self.accelerator
        name = checkpoint_name(state.step)
        final, tmp = self.ckpt_dir / name, self.ckpt_dir / f".tmp-{name}"
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
            if extra is not None:
                extra(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({"trainer": state.state_dict(),
                                                      "scheduler": scheduler.state_dict(),
                                                      "recipe_steps": recipe_steps, "run_id": self.run_id}))
            write_checksums(tmp)
            if final.exists() or final.is_symlink():
                if name in self.written:
                    shutil.rmtree(final)
                else:
                    aside = _aside(final)
                    os.replace(final, aside)
                    acc.print(f"{final} was not written by this run: moved to {aside.name}, not overwritten")
            os.replace(tmp, final)  # atomic: a kill leaves either the old or the new directory
            self.written.add(name)
            self.prune()
            if on_saved is not None:
                on_saved(final)
        acc.wait_for_everyone()
        return final

    def prune(self) -> None:
        """Keep the newest ``keep`` of this run's checkpoints; never delete one of another run,
        one a resume could not load, or anything that is not a checkpoint."""
        ours = [p for p in list_checkpoints(self.ckpt_dir) if p.name not in self.unloadable
                and (p.name in self.written or _run_id(p) == self.run_id)]
        for old in ours[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, state: TrainerState, scheduler: Any, recipe_steps: int,
                    extra: Optional[Callable[[Path], None]] = None) -> Optional[tuple[Path, dict]]:
        """Load the newest loadable checkpoint into the prepared objects, ``state`` and
        ``scheduler``; one that fails (checksums, corrupt files, a model the recipe no longer
        builds) is reported and the previous one tried. Returns (path, saved trainer_state.json),
        or None when there is no checkpoint at all. Raises ResumeError, changing nothing on disk,
        when checkpoints exist but none loads or the newest lies beyond ``recipe_steps``.
        ``extra(directory)`` loads the files ``save``'s ``extra`` wrote (a failure there makes
        the checkpoint unloadable like any other)."""
        acc = self.accelerator
        found = list_checkpoints(self.ckpt_dir)
        failures = []
        for path in reversed(found):
            try:
                saved = self._load(path, state, scheduler, recipe_steps, extra)
            except ResumeError:
                raise
            except Exception as exc:  # noqa: BLE001 - fall back to an older checkpoint
                why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                failures.append(f"{path.name}: {why}")
                self.unloadable.add(path.name)
                acc.print(f"checkpoint {path} could not be loaded ({why}); trying an older one")
                continue
            self.run_id = saved.get("run_id") or self.run_id
            return path, saved
        if failures:
            raise ResumeError(f"--resume: none of the {len(found)} checkpoint(s) under {self.ckpt_dir} could be "
                              "loaded; nothing was changed:\n" + "\n".join(f"  {f}" for f in failures))
        return None

    def _load(self, path: Path, state: TrainerState, scheduler: Any, recipe_steps: int,
              extra: Optional[Callable[[Path], None]] = None) -> dict:
        problem = verify_checksums(path)
        if problem:
            raise ValueError(problem)
        saved = json.loads((path / STATE_FILE).read_text())
        step = int(saved["trainer"]["step"])
        if step > recipe_steps:
            raise ResumeError(f"--resume: {path} is at step {step}, beyond this recipe's train.steps={recipe_steps}: "
                              "that run was longer. Raise train.steps to continue it, or use another output_dir; "
                              "nothing was changed")
        if extra is not None:  # before the model: a bad extra file leaves the run as it was
            extra(path)
        self.accelerator.load_state(str(path))
        state.load_state_dict(saved["trainer"])
        scheduler.load_state_dict(saved["scheduler"])
        return saved


def _aside(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.kept-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.kept-{n}")


def _run_id(path: Path) -> Optional[str]:
    try:
        return json.loads((path / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
