"""Training one run here, in a child process: its teacher-feature cache first (shared by the
runs that agree on it), then ``python -m radio_core.run`` with ``--resume`` when a checkpoint
exists. Its outcome is written to the run's own folder (``sweep_run.json``).

``sweep`` arguments are the runner's ``Sweep`` (not imported: the runner imports this module)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Optional

from ..formats.checkpoints import run_artifacts
from ..utils import EXIT_PREEMPTED
from .grid import PlannedRun
from .spec import LocalLauncher, RemoteLauncher
from .state import RUN_STATE, completed_step, error_line, last_logged_step, read_json, record, tail_lines, write_json


class SweepInterrupted(Exception):
    """A stop signal arrived while the sweep itself (not a run) was working."""


def parent_death_signal() -> Any:
    """Linux: a run gets SIGTERM (checkpoint and exit) if the sweep dies, even by SIGKILL, so a
    relaunched sweep never resumes a directory that an orphan still writes to."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: nothing to import after fork
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return set_signal


def recipe_processes(recipe) -> int:
    """Processes a recipe asks for: the ranks its groups name (the largest stage), else 1."""
    def ranks(groups) -> int:
        if groups and all(g.ranks for g in groups.values()):
            return sum(g.ranks for g in groups.values())
        return 1

    return max([ranks(recipe.groups)] + [ranks(s.groups or recipe.groups) for s in recipe.stages or []])


def train_prefix(launcher, run: PlannedRun) -> list[str]:
    """What starts ``-m radio_core.run`` for this run: the local command, or this Python (with
    torchrun on this node when the run needs several processes)."""
    if isinstance(launcher, LocalLauncher):
        return launcher.command or [sys.executable]
    n = processes(launcher, run)
    if n == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]


def processes(launcher: RemoteLauncher, run: PlannedRun) -> int:
    return launcher.processes or (recipe_processes(run.recipe) if run.recipe is not None else 1)


def next_attempt(run: PlannedRun) -> int:
    # Counted from the log files: a killed sweep never recorded its last attempt's exit.
    logs = run.run_dir / "logs"
    return 1 + max((int(p.stem.split("_")[1]) for p in logs.glob("attempt_*.stdout")
                    if p.stem.split("_")[1].isdigit()), default=0)


def train(sweep: Any, run: PlannedRun) -> Optional[str]:
    """Train (or resume) the run in a subprocess; returns a failure/interruption message or None."""
    if run.cache_key is not None:
        problem = ensure_cache(sweep, run)
        if problem:
            record(run, status="failed", error=problem)
            return f"failed: {problem}"
    # --resume also when an attempt died before its first checkpoint: a new run is refused in an
    # output_dir that holds one, and a resume without a checkpoint starts at step 0.
    resume = completed_step(run.run_dir) > 0 or bool(run_artifacts(run.run_dir))
    cmd = sweep.command(run, resume)
    (run.run_dir / "logs").mkdir(exist_ok=True)
    attempt = next_attempt(run)
    out_path, err_path = (run.run_dir / "logs" / f"attempt_{attempt}.{s}" for s in ("stdout", "stderr"))
    sweep.log_event("launch", run=run.name, attempt=attempt, resume=resume, command=cmd)
    t0 = time.perf_counter()
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        sweep.child = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL, env=env,
                                       preexec_fn=parent_death_signal())
        try:
            rc = _wait(sweep, run)
        finally:
            sweep.child = None
    wall = time.perf_counter() - t0
    status, error = _outcome(sweep, run, rc, err_path)
    attempts = (read_json(run.run_dir / RUN_STATE) or {}).get("attempts", []) + [
        {"attempt": attempt, "resumed": resume, "rc": rc, "wall_s": wall, "status": status}]
    record(run, attempts=attempts, status="running" if status == "trained" else status, error=error,
           trained=status == "trained")
    sweep.log_event("exit", run=run.name, attempt=attempt, rc=rc, status=status, wall_s=wall)
    return None if status == "trained" else f"{status}: {error}"


def _outcome(sweep: Any, run: PlannedRun, rc: int, err_path) -> tuple[str, Optional[str]]:
    """trained | interrupted | failed, and why."""
    step = completed_step(run.run_dir)
    if rc == 0 and step >= run.recipe.train.steps:
        return "trained", None
    if sweep.stop_signal is not None:
        return "interrupted", f"stopped at step {step} by the sweep's signal"
    if rc in (0, EXIT_PREEMPTED):
        return "interrupted", (f"the run stopped at step {step} of {run.recipe.train.steps} after a checkpoint "
                               "(stop signal); it resumes on relaunch")
    tail = tail_lines(err_path)
    (run.run_dir / "stderr_tail.txt").write_text("\n".join(tail) + "\n")
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    return "failed", f"{how}: {error_line(tail)}".rstrip(": ")


def _wait(sweep: Any, run: PlannedRun) -> int:
    """Wait for the run, showing its step (from the end of its metrics.jsonl)."""
    metrics = run.run_dir / "metrics.jsonl"
    shown = None
    while True:
        try:
            return sweep.child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            step = last_logged_step(metrics)
            if step is not None and step != shown:
                sweep.show(f"{run.name[:40]} step {step}/{run.recipe.train.steps}")
                shown = step


def ensure_cache(sweep: Any, run: PlannedRun) -> Optional[str]:
    """Build the run's shared teacher-feature cache unless it exists; an error message if it fails."""
    key = run.cache_key
    path = sweep.out / "cache" / key
    if key in sweep.failed_caches:
        return sweep.failed_caches[key]
    if (path / "index.json").is_file():
        return None
    from ..data.cache import build_cache
    from ..registry import get_registry

    sweep.show(f"{run.name[:40]} building teacher-feature cache {key}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path.parent / f"{key}.json", run.cache_identity)  # what the key stands for
    t0 = time.perf_counter()
    recipe = run.recipe.model_copy(update={"cache": None})
    try:
        build_cache(recipe, get_registry(), path, sweep.spec.cache.views, sweep.spec.cache.batch_size, progress=False)
    except SweepInterrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - the runs that need it fail; the others go on
        sweep.failed_caches[key] = f"teacher-feature cache {key}: {type(exc).__name__}: {exc}"
        sweep.log_event("cache_failed", key=key, error=sweep.failed_caches[key])
        return sweep.failed_caches[key]
    sweep.log_event("cache_built", key=key, path=str(path), wall_s=time.perf_counter() - t0)
    return None
