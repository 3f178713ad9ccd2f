"""Runs as sbatch jobs through submitit (``pip install 'radio-distill[slurm]'``).

Each run is one job: one task on one node, ``processes`` training processes (torchrun) inside
it. SLURM warns a job with USR2 ``signal_delay_s`` before its time limit or on pre-emption;
submitit then calls ``SlurmRun.checkpoint``: the run checkpoints and the job is requeued, and
resumes. A run that stops by itself after a checkpoint (SIGTERM from the scheduler, exit status
``EXIT_PREEMPTED``) is requeued the same way.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

try:
    import submitit
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("launcher slurm needs submitit: pip install 'radio-distill[slurm]'") from exc

from ..utils import EXIT_PREEMPTED
from .spec import SlurmLauncher
from .worker import RunHere


class SlurmRun(submitit.helpers.Checkpointable):
    """The job's payload (pickled by submitit): run ``name`` of the sweep here."""

    def __init__(self, sweep_path: str, output_dir: str, name: str, no_cache: bool) -> None:
        self.args = (sweep_path, output_dir, name, no_cache)
        self._here: Any = None

    def __call__(self) -> str:
        self._here = RunHere(*self.args)
        rc = self._here()
        if rc == EXIT_PREEMPTED:
            # Stopped after a checkpoint: requeue through submitit's own pre-emption path (its
            # handler requeues and exits). SLURM may be requeuing the job already (PreemptMode=
            # REQUEUE), and then refuses a second requeue: the job ends and is restarted anyway.
            try:
                os.kill(os.getpid(), submitit.JobEnvironment._usr_sig())
            except subprocess.CalledProcessError as exc:
                return f"pre-empted; scontrol requeue refused ({exc}); SLURM requeues pre-empted jobs itself"
        if rc != 0:
            raise RuntimeError(f"run {self.args[2]} did not finish (exit status {rc}); see its logs/")
        return "ok"

    def checkpoint(self, *args: Any, **kwargs: Any) -> "submitit.helpers.DelayedSubmission":
        if self._here is not None:
            self._here.stop()
        return submitit.helpers.DelayedSubmission(SlurmRun(*self.args))

    def __getstate__(self) -> dict:
        return {"args": self.args, "_here": None}


class SlurmJobs:
    kind = "slurm"
    requeues_itself = True

    def __init__(self, sweep: Any, options: SlurmLauncher) -> None:
        self.sweep, self.options = sweep, options
        self.folder = Path(options.folder or sweep.out / "jobs").absolute()
        self._jobs: dict[str, Any] = {}  # submitted by this process: their live handles

    def _executor(self, run: Any) -> Any:
        o = self.options
        common = dict(python=o.python, max_num_timeout=o.max_timeouts)
        if o.cluster == "local":
            ex = submitit.LocalExecutor(self.folder, **common)
            ex.update_parameters(timeout_min=o.time_min, gpus_per_node=o.gpus_per_node or 0, tasks_per_node=1,
                                 signal_delay_s=o.signal_delay_s, setup=o.setup)
            return ex
        ex = submitit.SlurmExecutor(self.folder, **common)
        params = dict(job_name=f"radio-{run.name}"[:120], time=o.time_min, nodes=1, ntasks_per_node=1,
                      signal_delay_s=o.signal_delay_s, setup=o.setup,
                      additional_parameters={"requeue": True, **o.additional})
        for key, value in (("partition", o.partition), ("account", o.account), ("qos", o.qos),
                           ("constraint", o.constraint), ("gpus_per_node", o.gpus_per_node),
                           ("cpus_per_task", o.cpus_per_task),
                           ("mem", f"{o.mem_gb:g}GB" if o.mem_gb else None)):
            if value is not None:
                params[key] = value
        ex.update_parameters(**params)
        return ex

    def submit(self, run: Any, no_cache: bool) -> dict:
        job = self._executor(run).submit(SlurmRun(str(self.sweep.sweep_path.absolute()), str(self.sweep.out),
                                                  run.name, no_cache))
        self._jobs[job.job_id] = job
        return {"id": job.job_id, "log": str(job.paths.stdout)}

    def state(self, job_id: str) -> str:
        """pending | running | ended | unknown."""
        if self.options.cluster == "local":
            job = self._jobs.get(job_id)
            if job is not None:
                return "running" if job.state == "RUNNING" else "ended"
            try:  # a job of an earlier sweep process: its controller's pid
                os.kill(int(job_id), 0)
            except (ProcessLookupError, ValueError):
                return "ended"
            except PermissionError:
                pass
            return "running"
        state = (self._jobs.get(job_id) or submitit.SlurmJob(self.folder, job_id)).state.split()[0]
        if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "CONFIGURING",
                     "RESIZING", "SUSPENDED", "READY"):
            return "pending"
        if state in ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"):
            return "running"
        return "unknown" if state == "UNKNOWN" else "ended"
