"""One run executed in this process, on whatever machine a launcher put it: the payload of a
SLURM or Ray job (``python -m radio_core.sweep SWEEP --execute NAME``).

It re-plans the sweep from the same file, trains (or resumes) the run, evaluates it and writes
its done marker, exactly as a local sweep does. Exit status: 0 done; ``EXIT_PREEMPTED`` (75)
stopped by SIGTERM after a checkpoint (requeue it); 1 failed; 2 already running elsewhere.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

from ..utils import EXIT_PREEMPTED
from .local import SweepInterrupted
from .spec import load_sweep
from .state import record

EXIT_BUSY = 2


class RunHere:
    """Execute run ``name`` of a sweep in this process; ``stop()`` asks it to checkpoint and exit."""

    def __init__(self, sweep_path: str, output_dir: str, name: str, no_cache: bool = False) -> None:
        self.sweep_path, self.output_dir, self.name, self.no_cache = sweep_path, output_dir, name, no_cache
        self.sweep = None

    def __call__(self) -> int:
        from .runner import Sweep

        spec = load_sweep(self.sweep_path)
        if self.no_cache:
            spec = spec.model_copy(update={"cache": None})
        self.sweep = sweep = Sweep(spec, self.sweep_path, self.output_dir, progress=False)
        run = next((r for r in sweep.runs if r.name == self.name), None)
        if run is None:
            print(f"error: the sweep has no run {self.name!r}", file=sys.stderr)
            return 1
        run.run_dir.mkdir(parents=True, exist_ok=True)
        lock = _try_lock(run.run_dir / ".run.lock")
        if lock is None:
            print(f"error: run {self.name} is already running ({run.run_dir / '.run.lock'} is held)", file=sys.stderr)
            return EXIT_BUSY
        old = {s: signal.signal(s, sweep._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if not run.error:
                record(run, worker={"host": socket.gethostname(), "pid": os.getpid()})
            status = sweep.execute(run)
        except SweepInterrupted:
            status = "interrupted: stopped during evaluation"
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            lock.close()
        print(f"{self.name}: {status}", flush=True)
        if status == "ok" or status.startswith("done"):
            return 0
        return EXIT_PREEMPTED if status.startswith("interrupted") else 1

    def stop(self) -> None:
        """The scheduler is about to take the node: the run checkpoints and exits."""
        child = self.sweep.child if self.sweep is not None else None
        if child is not None and child.poll() is None:
            self.sweep.stop_signal = signal.SIGTERM
            child.send_signal(signal.SIGTERM)
            child.wait()


def _try_lock(path: Path) -> Optional[object]:
    f = open(path, "a+")
    try:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        f.close()
        return None
    return f
