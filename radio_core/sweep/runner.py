"""The sweep: its runs in order, each trained, evaluated and marked done in its own folder;
signals handled so that a stopped sweep resumes where it was."""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ..recipe import dump_recipe
from ..utils import real_path
from . import local
from .evaluate import evaluate
from .grid import PlannedRun, override_string, plan
from .local import SweepInterrupted
from .spec import SweepError, SweepSpec
from .state import DONE_MARKER, LAUNCH_LOG, SNAPSHOT, record, run_state, snapshot_conflict, write_json


@contextlib.contextmanager
def run_lock(run: PlannedRun) -> Iterator[bool]:
    """Whether this process may work on ``run`` (an exclusive, non-blocking lock on a file in
    its folder, held until the run is done here): parallel sweep processes never train or
    evaluate one run twice, and every write to its folder happens under the lock."""
    import fcntl

    run.run_dir.mkdir(parents=True, exist_ok=True)
    with open(run.run_dir / ".sweep_run.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Sweep:
    def __init__(self, spec: SweepSpec, sweep_path: str | Path, output_dir: Optional[str | Path] = None,
                 progress: bool = True, no_cache: bool = False) -> None:
        self.spec, self.sweep_path = spec, Path(sweep_path)
        self.out = Path(output_dir or spec.output_dir).absolute()
        self.base_recipe = real_path(self.sweep_path.parent / spec.recipe)
        self.runs = plan(spec, sweep_path, self.out)
        self.progress = progress
        #: the cache section was dropped (--no-cache): jobs started elsewhere must drop it too.
        self.no_cache = no_cache
        self.child: Optional[subprocess.Popen] = None
        self.stop_signal: Optional[int] = None
        self.failed_caches: dict[str, str] = {}
        self._bar: Any = None
        self.workers: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ selection and state
    def select(self, only: Optional[Sequence[str]]) -> list[PlannedRun]:
        if not only:
            return list(self.runs)
        chosen = [r for r in self.runs if any(fnmatch.fnmatchcase(r.name, pat) for pat in only)]
        if not chosen:
            raise SweepError(f"--only {' '.join(only)}: no run matches; runs are: "
                             + ", ".join(r.name for r in self.runs))
        return chosen

    def command(self, run: PlannedRun, resume: bool) -> list[str]:
        launcher = local.train_prefix(self.spec.launcher, run)
        extra = [override_string("output_dir", str(run.run_dir))]
        if run.cache_key is not None:
            extra += [override_string("cache.path", str(self.out / "cache" / run.cache_key)),
                      f"augment.views={self.spec.cache.views}"]
        return [*launcher, "-m", "radio_core.run", str(self.base_recipe), *run.resolved_overrides, *extra] \
            + (["--resume"] if resume else [])

    def state_of(self, run: PlannedRun) -> str:
        return run_state(run, self.eval_of(run).model_dump(mode="json"))

    def eval_of(self, run: PlannedRun):
        """The run's evaluation: the sweep's, with its run entry's own merged over it."""
        return self.spec.eval_for(run.eval_override)

    def log_event(self, event: str, **fields: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LAUNCH_LOG, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def show(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        for w in getattr(self, "workers", []):  # each worker stops its own run the same way
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        if self.stop_signal is not None:  # second signal: stop waiting for the run's checkpoint
            if self.child is not None and self.child.poll() is None:
                self.child.kill()
            raise SweepInterrupted
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            # One SIGTERM (never a second SIGINT, which aborts a run without its checkpoint):
            # the run checkpoints after its current step and exits; --resume continues it.
            self.child.send_signal(signal.SIGTERM)
        else:
            raise SweepInterrupted  # cache build or evaluation: redone on relaunch

    # ------------------------------------------------------------------ main loop
    def run(self, only: Optional[Sequence[str]] = None, jobs: int = 1, worker: bool = False) -> int:
        """Bring the selected runs to done. With ``jobs`` > 1, ``jobs - 1`` worker processes
        (``--worker``) share the runs with this one through per-run locks, each run and each
        evaluation using one CPU thread; this process alone writes the tables (under the sweep
        lock), after the workers are done."""
        from tqdm.auto import tqdm

        from ..progress import progress

        selected = self.select(only)
        self.out.mkdir(parents=True, exist_ok=True)
        lock = None if worker else self.lock()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        if jobs > 1 or worker:
            os.environ["OMP_NUM_THREADS"] = "1"  # the training processes read it
            import torch

            torch.set_num_threads(1)  # evaluation in this process
        self.workers = self._start_workers(jobs - 1, only) if jobs > 1 else []
        tqdm.monitor_interval = 0  # no monitor thread: runs are started with fork + exec
        # runs done, rate and ETA; in a log file one line per finished run
        self._bar = progress(len(selected), "sweep worker" if worker else "sweep", "run", enabled=self.progress,
                             every_s=None)
        try:
            for run in selected:
                if self.stop_signal is not None:
                    break
                self.show(run.name[:40])
                with run_lock(run) as mine:
                    status = self.execute(run) if mine else "running in another sweep process (skipped here)"
                self._bar.write(f"{run.name}: {status}")
                self._bar.update(1)
                self._bar.line()
        except SweepInterrupted:
            self._bar.write("sweep interrupted: re-launch the same command to continue")
        finally:
            self._bar.close()
            self._bar = None
            failed_workers = [w.args for w in self.workers if w.wait() not in (0, 1)]
            for s, h in old.items():
                signal.signal(s, h)
        if worker:
            return 128 + self.stop_signal if self.stop_signal is not None else 0
        if self.spec.references is not None and self.stop_signal is None:
            self.update_references()
        rows = self.write_results()
        lock.close()
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        if failed_workers:
            print(f"{len(failed_workers)} sweep worker process(es) stopped abnormally: relaunch to finish their runs")
            return 1
        return 0 if all(r["status"] == "ok" for r in rows if r["name"] in {x.name for x in selected}) else 1

    def _start_workers(self, count: int, only: Optional[Sequence[str]]) -> list[subprocess.Popen]:
        cmd = [sys.executable, "-m", "radio_core.sweep", str(self.sweep_path), "--worker", "--output-dir", str(self.out),
               "--no-progress"] + [a for pat in only or [] for a in ("--only", pat)] \
            + (["--no-cache"] if self.no_cache else [])
        self.log_event("workers", count=count, command=cmd)
        return [subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 preexec_fn=local.parent_death_signal()) for _ in range(count)]

    def lock(self) -> contextlib.ExitStack:
        """The sweep folder's lock (``close()`` releases it); SweepError naming the process that
        holds it (pid, host, command) when another sweep runs here."""
        from ..locks import LockTimeout, describe_holder, file_lock

        self.out.mkdir(parents=True, exist_ok=True)
        stack = contextlib.ExitStack()
        path = self.out / ".sweep.lock"
        try:
            stack.enter_context(file_lock(path, f"the sweep folder {self.out}", timeout=0))
        except LockTimeout:
            raise SweepError(f"output_dir: another sweep is running in {self.out} ({describe_holder(path)})") from None
        return stack

    def lock_held(self) -> bool:
        """Whether a sweep process is working in this output folder now."""
        try:
            lock = self.lock()
        except SweepError:
            return True
        lock.close()
        return False

    def execute(self, run: PlannedRun) -> str:
        """Bring one run to done: train (or resume) it, evaluate it, mark it; a status line."""
        state = self.state_of(run)
        if state == "invalid":
            run.run_dir.mkdir(parents=True, exist_ok=True)
            record(run, status="failed", error=run.error, resolved_overrides=[])
            self.log_event("invalid", run=run.name, error=run.error)
            return f"failed: {run.error}"
        if state == "done":
            self.log_event("skip", run=run.name)
            return "done already (skipped)"
        conflict = snapshot_conflict(run)
        if conflict:
            record(run, status="failed", error=conflict)
            self.log_event("conflict", run=run.name, error=conflict)
            return f"failed: {conflict}"

        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / DONE_MARKER).unlink(missing_ok=True)
        (run.run_dir / SNAPSHOT).write_text(dump_recipe(run.recipe))
        record(run, overrides=run.overrides, resolved_overrides=run.resolved_overrides, arm=run.arm, seed=run.seed,
               base_recipe=str(self.base_recipe), status="running", error=None)
        if state != "evaluate":
            failure = local.train(self, run)
            if failure is not None:
                return failure
        return self._evaluate_and_mark(run)

    def _evaluate_and_mark(self, run: PlannedRun) -> str:
        results, eval_s = {}, 0.0
        spec = self.eval_of(run)
        if spec.enabled:
            self.show(f"{run.name[:40]} evaluating")
            t0 = time.perf_counter()
            try:
                results = evaluate(run.run_dir, spec)
            except SweepInterrupted:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken evaluation fails this run only
                error = f"evaluation: {type(exc).__name__}: {exc}"
                record(run, status="failed", error=error)
                self.log_event("eval_failed", run=run.name, error=error)
                return f"failed: {error}"
            eval_s = time.perf_counter() - t0
        state_now = record(run, status="ok", error=None, eval=results, eval_s=eval_s)
        wall = sum(a.get("wall_s", 0) for a in state_now["attempts"]) + eval_s
        # Written last: its presence means training and evaluation both completed.
        write_json(run.run_dir / DONE_MARKER, {"eval_spec": spec.model_dump(mode="json"), "eval": results,
                                               "wall_s": wall, "time": time.time()})
        return "ok"

    def update_references(self) -> None:
        """Score the reference rows (teachers, baselines) the finished runs make possible; a
        failure is reported and the tables are written without them."""
        from . import references

        try:
            references.update(self, log=print)
        except SweepInterrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - the runs' own results still get their tables
            self.log_event("references_failed", error=f"{type(exc).__name__}: {exc}")
            print(f"references: {type(exc).__name__}: {exc}")

    def write_results(self, quiet: bool = False) -> list[dict[str, Any]]:
        from .results import write_results

        return write_results(self, quiet)
