"""Runs handed to a scheduler (SLURM, Ray), and the status of every run of a sweep.

The run folders stay the single source of truth: a submitted run's ``sweep_run.json`` records
its job (launcher, id, log); the job itself writes progress and the done marker there. A run
whose recorded job is still queued or running is never submitted again; one whose job ended
without finishing is failed (or, pre-empted, requeued) and is submitted again on relaunch.
``sweep`` arguments are the runner's ``Sweep``.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any, Optional

from .grid import PlannedRun
from .spec import LocalLauncher, RayLauncher
from .state import RUN_STATE, completed_step, read_json, record, snapshot_conflict


@dataclass
class RunStatus:
    #: pending | running | done | failed
    status: str
    detail: str = ""
    #: a recorded job is queued or running: submitting again would start the run twice.
    job_active: bool = False
    #: stopped after a checkpoint (pre-empted, interrupted): resumes when started again.
    resumable: bool = False


def make_jobs(sweep: Any) -> Any:
    options = sweep.spec.launcher
    if isinstance(options, LocalLauncher):
        return None
    if isinstance(options, RayLauncher):
        from .ray_launcher import RayJobs

        return RayJobs(sweep, options)
    from .slurm_launcher import SlurmJobs

    return SlurmJobs(sweep, options)


def run_status(sweep: Any, run: PlannedRun, jobs: Any) -> RunStatus:
    state = sweep.state_of(run)
    if state == "invalid":
        return RunStatus("failed", run.error or "")
    if state == "done":
        return RunStatus("done")
    saved = read_json(run.run_dir / RUN_STATE) or {}
    job = saved.get("job")
    steps = f"step {completed_step(run.run_dir)}/{run.recipe.train.steps}"
    if job and jobs is not None and job.get("launcher") == jobs.kind:
        where = jobs.state(job["id"])
        if where == "pending":
            return RunStatus("pending", f"job {job['id']} queued", job_active=True)
        if where in ("running", "unknown"):
            note = "" if where == "running" else " (the scheduler cannot tell its state)"
            return RunStatus("running", f"job {job['id']}{note}, {steps}", job_active=True)
    if saved.get("status") == "failed":
        return RunStatus("failed", saved.get("error") or "")
    if saved.get("status") == "interrupted" or state.startswith("resume") or state == "evaluate":
        return RunStatus("pending", f"stopped at {steps}; resumes when started again", resumable=True)
    if job and saved.get("status") in ("queued", "running"):
        return RunStatus("failed", f"job {job['id']} ended before the run finished ({steps}); log: {job.get('log')}")
    if saved.get("status") == "running" and sweep.lock_held():
        return RunStatus("running", f"here, {steps}")
    return RunStatus("pending", "not started")


def submit(sweep: Any, run: PlannedRun, jobs: Any, no_cache: bool) -> str:
    conflict = snapshot_conflict(run)
    if conflict:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        record(run, status="failed", error=conflict)
        sweep.log_event("conflict", run=run.name, error=conflict)
        return f"failed: {conflict}"
    run.run_dir.mkdir(parents=True, exist_ok=True)
    job = {"launcher": jobs.kind, **jobs.submit(run, no_cache), "submitted": time.time()}
    history = (read_json(run.run_dir / RUN_STATE) or {}).get("jobs", [])
    record(run, job=job, jobs=history + [job], status="queued", error=None, arm=run.arm, seed=run.seed)
    sweep.log_event("submit", run=run.name, job=job)
    return f"submitted as {jobs.kind} job {job['id']}"


def start(sweep: Any, run: PlannedRun, jobs: Any, no_cache: bool) -> tuple[str, bool]:
    """Submit the run unless it is done, invalid or already queued/running; (message, watch it)."""
    st = run_status(sweep, run, jobs)
    if st.status == "done":
        sweep.log_event("skip", run=run.name)
        return "done already (skipped)", False
    if run.error:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        record(run, status="failed", error=run.error, resolved_overrides=[])
        sweep.log_event("invalid", run=run.name, error=run.error)
        return f"failed: {run.error}", False
    if st.job_active:
        sweep.log_event("already_submitted", run=run.name, detail=st.detail)
        return f"{st.status}: {st.detail} (not submitted again)", True
    message = submit(sweep, run, jobs, no_cache)
    return message, not message.startswith("failed")


def run_remote(sweep: Any, selected: list[PlannedRun], no_cache: bool = False) -> int:
    """Submit every selected run that needs it; with ``wait``, follow the jobs to their end."""
    lock = sweep.lock()
    try:
        return _submit_and_wait(sweep, selected, no_cache)
    finally:
        lock.close()


def _submit_and_wait(sweep: Any, selected: list[PlannedRun], no_cache: bool) -> int:
    jobs = make_jobs(sweep)
    watched = []
    for run in selected:
        message, watch = start(sweep, run, jobs, no_cache)
        print(f"{run.name}: {message}", flush=True)
        if watch:
            watched.append(run)
    interrupted = wait(sweep, watched, jobs, no_cache) if sweep.spec.launcher.wait else None
    rows = sweep.write_results()
    if interrupted is not None:
        print("stopped waiting; the jobs go on: `radio sweep FILE --status` shows them, relaunching collects them")
        return 128 + interrupted
    if not sweep.spec.launcher.wait:
        return 0
    names = {r.name for r in selected}
    return 0 if all(r["status"] == "ok" for r in rows if r["name"] in names) else 1


def wait(sweep: Any, watched: list[PlannedRun], jobs: Any, no_cache: bool) -> Optional[int]:
    """Follow the jobs until each has ended; tables are rewritten whenever one finishes.
    Returns the signal that stopped the waiting, if one did (the jobs are left running)."""
    stop: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        active = list(watched)
        while active and not stop:
            deadline = time.monotonic() + sweep.spec.launcher.poll_s
            while not stop and time.monotonic() < deadline:
                time.sleep(0.2)
            for run in list(active):
                st = run_status(sweep, run, jobs)
                if st.job_active:
                    continue
                if st.resumable and _may_requeue(run, jobs, sweep):
                    print(f"{run.name}: pre-empted ({st.detail}); {submit(sweep, run, jobs, no_cache)}", flush=True)
                    continue
                active.remove(run)
                sweep.log_event("finished", run=run.name, status=st.status, detail=st.detail)
                print(f"{run.name}: {st.status}{': ' + st.detail if st.detail else ''}", flush=True)
                sweep.write_results(quiet=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return stop[0] if stop else None


def _may_requeue(run: PlannedRun, jobs: Any, sweep: Any) -> bool:
    """Schedulers that do not requeue a pre-empted job themselves (Ray) get it resubmitted."""
    if jobs.requeues_itself:
        return False
    submitted = len((read_json(run.run_dir / RUN_STATE) or {}).get("jobs", []))
    return submitted <= getattr(sweep.spec.launcher, "max_requeues", 0)


def print_status(sweep: Any, selected: list[PlannedRun]) -> int:
    """One line per run (pending/running/done/failed and why), then counts per state."""
    jobs = make_jobs(sweep)
    counts: dict[str, int] = {}
    for run in selected:
        st = run_status(sweep, run, jobs)
        counts[st.status] = counts.get(st.status, 0) + 1
        print(f"{st.status:8s} {run.name}{'  ' + st.detail if st.detail else ''}")
    print(", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "running", "pending", "failed")))
    return 0
