"""What a run's own folder says about it: the sweep's only record of progress.

``sweep_run.json`` (status, attempts, errors), ``SWEEP_DONE.json`` (written last: training and
evaluation both finished, with the evaluation's numbers), the checkpoints and ``metrics.jsonl``.
Every write is atomic, so a killed sweep never leaves half a file.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml

from .grid import PlannedRun

DONE_MARKER = "SWEEP_DONE.json"
RUN_STATE = "sweep_run.json"
SNAPSHOT = "resolved_recipe.yaml"
LAUNCH_LOG = "launches.jsonl"


def read_json(path: Path) -> Optional[dict]:
    """A state file's content; None when it is missing or unusable (not a regular file, malformed)."""
    from ..utils import UserFileError, read_user_json

    if not path.exists():
        return None
    try:
        data = read_user_json(path, "sweep state file")
    except UserFileError:
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    """Atomic: a temporary file of this process's own, renamed over ``path`` (a kill never leaves
    half a file, and two processes never share a temporary name)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(run: PlannedRun, **fields: Any) -> dict:
    """Update the run's ``sweep_run.json`` with ``fields``; returns the new state."""
    state = read_json(run.run_dir / RUN_STATE) or {"name": run.name, "overrides": run.overrides, "attempts": []}
    state.update(fields)
    write_json(run.run_dir / RUN_STATE, state)
    return state


def completed_step(run_dir: Path) -> int:
    """Step of the newest complete checkpoint (0 if none)."""
    ckpts = run_dir / "checkpoints"
    steps = [int(p.name[len("step_"):]) for p in ckpts.glob("step_*")
             if p.is_dir() and p.name[len("step_"):].isdigit() and (p / "trainer_state.json").is_file()] \
        if ckpts.is_dir() else []
    return max(steps, default=0)


def run_state(run: PlannedRun, eval_spec: dict) -> str:
    """invalid | done | evaluate (trained, evaluation missing or of another spec) | resume from
    step N | new."""
    if run.error:
        return "invalid"
    marker = read_json(run.run_dir / DONE_MARKER)
    if marker is not None:
        return "done" if marker.get("eval_spec") == eval_spec else "evaluate"
    if (read_json(run.run_dir / RUN_STATE) or {}).get("trained"):
        return "evaluate"
    step = completed_step(run.run_dir)
    return f"resume from step {step}" if step else "new"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def snapshot_conflict(run: PlannedRun) -> Optional[str]:
    """A run directory must only ever be resumed with the recipe it was started with."""
    old_path = run.run_dir / SNAPSHOT
    if not old_path.is_file():
        return None
    from ..utils import UserFileError, read_user_text

    try:
        old = _flatten(yaml.safe_load(read_user_text(old_path, "recipe snapshot")))
    except (UserFileError, yaml.YAMLError, ValueError) as exc:
        return f"{run.run_dir}: its {SNAPSHOT} is unreadable ({exc}); remove the directory to rerun it"
    new = _flatten(run.recipe.model_dump(mode="json"))
    # Keys only one side has are schema changes (a radio-distill upgrade), not a different run.
    diff = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if not diff:
        return None
    return (f"{run.run_dir} holds a run of a different recipe (changed: {', '.join(diff[:6])}); "
            "the base recipe or sweep overrides changed since it started: remove the directory to rerun it")


def tail_lines(path: Path, n: int = 40) -> list[str]:
    from ..utils import UserFileError, read_user_file

    if not path.exists():
        return []
    try:  # a log or metrics file replaced by a FIFO or a device is not read (it would hang)
        text = read_user_file(path, "run log").decode(errors="replace")
    except UserFileError:
        return []
    lines = [l for l in re.split(r"[\r\n]+", text) if l.strip()]
    return lines[-n:]


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in tail_lines(path, 10**9):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return out


def last_logged_step(metrics: Path) -> Optional[int]:
    """Step of the last complete line of a metrics.jsonl, reading only its end."""
    from ..utils import UserFileError, check_user_file

    try:
        check_user_file(metrics, "training log", None)
    except UserFileError:
        return None
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return None


def error_line(lines: list[str]) -> str:
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^\w+(Error|Exception)\b", line):
            return line
    return lines[-1] if lines else ""
