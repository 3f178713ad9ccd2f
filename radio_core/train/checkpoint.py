"""Checkpoints: atomic save with checksums, pruning of this run's own, loading the newest
loadable one, and the guard that keeps a new run out of an output_dir that holds one.

A checkpoint is the training state as safetensors + JSON (``state_files``: model, optimiser,
RNG; nothing in it is ever unpickled, so a checkpoint can never run code) plus
``trainer_state.json`` (the trainer's counters, the LR scheduler's state and the run id) plus
``checksums.json`` (SHA-256 of every file; a checkpoint without it, or with a file it does not
list, is not loaded). A write that fails (a full disk) removes its temp folder and raises
CheckpointWriteError; the previous checkpoint is untouched.

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
    STATE_FILE,
    checkpoint_name,
    list_checkpoints,
    run_artifacts,
    trim_jsonl,
    verify_checksums,
    write_checksums,
)
from ..formats.run_folder import (
    MANIFEST_FILE,
    RUN_OUTPUTS,
    RunFolderError,
    foreign_outputs,
    forget,
    lock_run_folder,
    read_manifest,
    record,
    remove_recorded,
    unlock_run_folder,
)
from ..utils import read_user_json
from .state_files import load_state, save_state


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, ...); its partial folder was removed."""


class ResumeError(ValueError):
    """--resume found checkpoints but can use none of them; nothing was changed."""


class RunExistsError(ValueError):
    """A new run was asked for in an output_dir that already holds one."""


def hold_run_folder(out_dir: Path) -> bool:
    """On the main process (global rank 0, before any process group exists): take the output
    folder's exclusive lock for the run's life (RunExistsError naming the holder if another run
    has it). True when this process took it."""
    if os.environ.get("RANK", "0") not in ("0", ""):
        return False
    try:
        lock_run_folder(out_dir)
    except RunFolderError as exc:
        raise RunExistsError(str(exc)) from None
    except OSError as exc:
        raise RunExistsError(f"output_dir {out_dir}: cannot be used ({exc.strerror or exc})") from None
    return True


def check_new_run(out_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse a new run where a run lives unless ``overwrite``, and any run where files that no
    run recorded writing (a user's own ``export/``, ``recipe.yaml``...) are in the way of what it
    writes; True when the earlier run's recorded outputs must be removed (by ``prepare_out_dir``,
    at the start of training)."""
    if resume and overwrite:
        raise RunExistsError("--resume and --overwrite contradict each other: choose one")
    try:
        manifest = read_manifest(out_dir)
        foreign = foreign_outputs(out_dir)
    except RunFolderError as exc:
        raise RunExistsError(str(exc)) from None
    if resume and manifest is None:
        return False  # a run folder of an older version: --resume adopts what is there
    if manifest is None and foreign:
        raise RunExistsError(f"output_dir {out_dir} holds {', '.join(foreign)} but no {MANIFEST_FILE}: no run "
                             "recorded writing them (an older version's run: continue it with --resume, or remove "
                             "them by hand); a new run would mix with or replace them, and --overwrite deletes only "
                             "what a manifest lists")
    found = [] if resume else run_artifacts(out_dir)
    if found and not overwrite:
        raise RunExistsError(f"output_dir {out_dir} already holds a run ({', '.join(found)}); continue it with "
                             "--resume, start over with --overwrite (removes that run's outputs), or choose "
                             "another output_dir")
    if foreign:
        raise RunExistsError(f"output_dir {out_dir} holds {', '.join(foreign)}, files that no run recorded writing "
                             f"(not in {MANIFEST_FILE}); a run writes there and would mix with or replace them: "
                             "move them, or choose another output_dir (--overwrite never deletes them)")
    return manifest is not None and not resume


def prepare_out_dir(out_dir: Path, step: int, remove_outputs: bool, say: Callable[[str], None],
                    writes: tuple[str, ...] = ()) -> None:
    """Main process, at the start of training: with --overwrite remove the earlier run's
    recorded outputs (only those); record what this run will write (``writes``; an older
    version's folder resumed: what it holds); cut the per-step logs back to ``step``, the step
    this run continues from, so that each step is logged once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if remove_outputs:
        remove_recorded(out_dir, say)
    if read_manifest(out_dir) is None:  # new, or an older version's run resumed: adopt its outputs
        adopted = [n for n in RUN_OUTPUTS if (out_dir / n).exists()]
        adopted += [f"checkpoints/{p.name}" for p in list_checkpoints(out_dir / "checkpoints")]
        adopted += [p.name for p in out_dir.glob("samples_rank*.jsonl")]
        record(out_dir, adopted)
    record(out_dir, writes)
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
    #: optimiser steps with a finite, non-zero objective: 0 at the end means the run learned nothing
    learned_steps: int = 0
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
        self.model: Any = None  # the prepared module and optimiser (``attach``)
        self.optimizer: Any = None
        self.sharded = self.gather = False

    def attach(self, model: Any, optimizer: Any, sharded: bool, gather: bool = False) -> None:
        """What ``save`` writes and ``load_latest`` loads into (once the trainer built them);
        ``sharded``: under FSDP; ``gather``: also write the gathered full weights. Every rank
        calls it: the main process's run id becomes every rank's (the temp folder's name)."""
        self.model, self.optimizer, self.sharded, self.gather = model, optimizer, sharded, gather
        acc = self.accelerator
        if acc.num_processes > 1:
            import torch
            from accelerate.utils import broadcast

            ident = torch.tensor(list(bytes.fromhex(self.run_id)), dtype=torch.int64, device=acc.device)
            self.run_id = bytes(broadcast(ident, from_process=0).cpu().tolist()).hex()

    def save(self, state: TrainerState, scheduler: Any, recipe_steps: int,
             on_saved: Optional[Callable[[Path], None]] = None,
             extra: Optional[Callable[[Path], None]] = None) -> Path:
        """``extra(directory)``: the main process writes further files (MESA's EMA) into the
        checkpoint before its checksums."""
        acc = self.accelerator
        name = checkpoint_name(state.step)
        # the temp name is unique to this run (its lock keeps others out of the folder anyway)
        final, tmp = self.ckpt_dir / name, self.ckpt_dir / f".tmp-{name}-{self.run_id[:12]}"
        problem = ""
        try:
            if acc.is_main_process:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
        except OSError as exc:
            problem = _why(exc)
        self._agree(problem, tmp, final)
        try:
            save_state(tmp, acc, self.model, self.optimizer, self.sharded, self.gather)
        except Exception as exc:  # noqa: BLE001 - OSError, safetensors' and dcp's own wrappers of it
            problem = _why(exc)
        # every rank writes its own files into tmp: the main process must not rename tmp before
        # the slowest rank has (seen on a loaded machine); a rank's failure is every rank's.
        self._agree(problem, tmp, final)
        if acc.is_main_process:
            try:
                if extra is not None:  # e.g. MESA's EMA: inside the checkpoint, under its checksums
                    extra(tmp)
                (tmp / STATE_FILE).write_text(json.dumps({"trainer": state.state_dict(),
                                                          "scheduler": scheduler.state_dict(),
                                                          "recipe_steps": recipe_steps, "run_id": self.run_id}))
                write_checksums(tmp)
            except OSError as exc:
                problem = _why(exc)
        self._agree(problem, tmp, final)
        if acc.is_main_process:
            if final.exists() or final.is_symlink():
                if name in self.written:
                    shutil.rmtree(final)
                else:
                    aside = _aside(final)
                    os.replace(final, aside)
                    acc.print(f"{final} was not written by this run: moved to {aside.name}, not overwritten")
            record(self.ckpt_dir.parent, ["checkpoints", f"checkpoints/{name}"])  # before it exists: a kill
            os.replace(tmp, final)  # atomic: a kill leaves either the old or the new directory
            self.written.add(name)
            self.prune()
            if on_saved is not None:
                on_saved(final)
        acc.wait_for_everyone()
        return final

    def _agree(self, problem: str, tmp: Path, final: Path) -> None:
        """A barrier at which every rank learns whether any rank failed to write; then all raise
        CheckpointWriteError together, with the partial folder removed."""
        acc = self.accelerator
        failed = bool(problem)
        if acc.num_processes > 1:
            import torch

            flag = acc.reduce(torch.tensor([1.0 if problem else 0.0], device=acc.device), "sum")
            failed = float(flag.item()) > 0
        if not failed:
            return
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        older = [p.name for p in list_checkpoints(self.ckpt_dir) if p != final]
        kept = f"the previous checkpoint {older[-1]} is intact" if older else "there is no earlier checkpoint"
        raise CheckpointWriteError(f"checkpoint {final.name} could not be written under {self.ckpt_dir}: "
                                   f"{problem or 'another rank failed to write its part'}; the partial folder was "
                                   f"removed and {kept}")

    def prune(self) -> None:
        """Keep the newest ``keep`` of this run's checkpoints; never delete one of another run,
        one a resume could not load, or anything that is not a checkpoint."""
        ours = [p for p in list_checkpoints(self.ckpt_dir) if p.name not in self.unloadable
                and (p.name in self.written or _run_id(p) == self.run_id)]
        for old in ours[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        if ours[:-self.keep]:
            forget(self.ckpt_dir.parent, [f"checkpoints/{p.name}" for p in ours[:-self.keep]])

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
        saved = read_user_json(path / STATE_FILE, "trainer state")
        step = int(saved["trainer"]["step"])
        if step > recipe_steps:
            raise ResumeError(f"--resume: {path} is at step {step}, beyond this recipe's train.steps={recipe_steps}: "
                              "that run was longer. Raise train.steps to continue it, or use another output_dir; "
                              "nothing was changed")
        if extra is not None:  # before the model: a bad extra file leaves the run as it was
            extra(path)
        load_state(path, self.accelerator, self.model, self.optimizer, self.sharded)
        state.load_state_dict(saved["trainer"])
        scheduler.load_state_dict(saved["scheduler"])
        return saved


def _why(exc: BaseException) -> str:
    """``No space left on device (FILE)``: the OS's words and the file, in one line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _aside(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.kept-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.kept-{n}")


def _run_id(path: Path) -> Optional[str]:
    try:
        return read_user_json(path / STATE_FILE, "trainer state").get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
