"""Runs as Ray jobs (Job Submission API) on a running Ray cluster (``pip install
'radio-distill[ray]'``): each run's entrypoint is ``python -m radio_core.sweep SWEEP --execute
NAME`` with the launcher's resources; the cluster's nodes must see the sweep's paths.

A job's id is derived from the output folder, the run and its attempt number, so two sweep
processes can never submit the same attempt twice (Ray refuses a duplicate id)."""
from __future__ import annotations

import hashlib
import os
import shlex
import sys
from typing import Any

from .spec import RayLauncher

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class RayJobs:
    kind = "ray"
    requeues_itself = False

    def __init__(self, sweep: Any, options: RayLauncher) -> None:
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as exc:
            raise ImportError("launcher ray needs Ray's job client: pip install 'radio-distill[ray]'") from exc
        self.sweep, self.options = sweep, options
        self.address = options.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
        self._client_class = JobSubmissionClient
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._client_class(self.address)
        return self._client

    def submit(self, run: Any, no_cache: bool) -> dict:
        from .state import RUN_STATE, read_json

        attempt = 1 + len((read_json(run.run_dir / RUN_STATE) or {}).get("jobs", []))
        key = hashlib.sha1(str(self.sweep.out).encode()).hexdigest()[:8]
        job_id = f"radio-{key}-{run.name}-{attempt}"
        cmd = [self.options.python or sys.executable, "-m", "radio_core.sweep", str(self.sweep.sweep_path.absolute()),
               "--output-dir", str(self.sweep.out), "--execute", run.name, "--no-progress"] \
            + (["--no-cache"] if no_cache else [])
        o = self.options
        try:
            self.client.submit_job(entrypoint=shlex.join(cmd), submission_id=job_id, runtime_env=o.runtime_env or None,
                                   entrypoint_num_cpus=o.num_cpus, entrypoint_num_gpus=o.num_gpus,
                                   entrypoint_resources=o.resources or None,
                                   metadata={"radio_sweep": str(self.sweep.out), "run": run.name})
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
            # another sweep process submitted this very attempt: watch that job instead
        return {"id": job_id, "log": f"ray job logs {job_id} --address {self.address}"}

    def state(self, job_id: str) -> str:
        try:
            status = str(self.client.get_job_status(job_id)).rsplit(".", 1)[-1]
        except Exception:  # noqa: BLE001 - cluster unreachable or job unknown: say so, start nothing
            return "unknown"
        return {"PENDING": "pending", "RUNNING": "running"}.get(status, "ended")
