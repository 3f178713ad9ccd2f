"""Ablation sweeps: one base recipe, many training runs that differ by dotted overrides.

    python -m radio_core.sweep SWEEP.yaml [--only NAME] [--dry-run]
    radio sweep SWEEP.yaml [--only NAME] [--dry-run]

A sweep file (validated like a recipe: unknown keys are errors naming the file and field)::

    recipe: ../quickstart.yaml            # base recipe, relative to this sweep file
    output_dir: runs/ablation_loss        # relative to the current directory, like a recipe's
    overrides: [train.steps=200]          # applied to every run
    grid:                                 # cartesian product; '*' matches every key at its level
      teachers.*.summary_loss.name: [cosine, mse]
      optim.lr: [1.0e-3, 3.0e-4]
    runs:                                 # explicit runs; crossed with the grid when both are given
      - {name: no_sam, overrides: ["teachers.sam=null"]}
    cache: {views: 4}                     # one teacher-feature cache per group of runs that agree
    eval: {fidelity: true, knn: {data: DIR}, zeroshot: {data: DIR}}
    launcher: [accelerate, launch, --num_processes, "8"]   # optional; default: this python

Each run trains in its own process (``python -m radio_core.run BASE overrides...
output_dir=OUTPUT_DIR/runs/<name>``), so a crash is recorded and the sweep goes on. Re-launching
the same sweep skips finished runs (marker ``SWEEP_DONE.json``, written after training and
evaluation), resumes interrupted ones with ``--resume`` and retries failed ones.

Output: ``runs/<name>/`` (the run's own output plus ``resolved_recipe.yaml``, ``sweep_run.json``,
``logs/``), ``cache/<key>/``, ``launches.jsonl`` (one line per launch, exit, skip and cache
build), ``results.md``, ``results.csv`` and ``plots/<metric>.png``.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .recipe import Recipe, RecipeError, apply_overrides, dump_recipe, load_raw, validate

DONE_MARKER = "SWEEP_DONE.json"
RUN_STATE = "sweep_run.json"
SNAPSHOT = "resolved_recipe.yaml"
LAUNCH_LOG = "launches.jsonl"
MAX_NAME = 96


class SweepError(ValueError):
    """A sweep file that cannot be used; the message names the file and the field."""


class SweepInterrupted(Exception):
    """A stop signal arrived while the sweep itself (not a run) was working."""


# ---------------------------------------------------------------------------------------
# sweep file schema


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _check_override(item: str) -> str:
    key, sep, _ = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form key.path=value")
    if key == "output_dir":
        raise ValueError("output_dir is set by the sweep (OUTPUT_DIR/runs/<name>); set the sweep's output_dir")
    return item


#: a dotted ``key.path=value`` override (the value is YAML), checked one by one.
Override = Annotated[str, AfterValidator(_check_override)]


class RunEntry(Strict):
    #: directory name of the run (default: derived from its overrides).
    name: Optional[str] = None
    overrides: list[Override] = Field(default_factory=list)


class CacheShare(Strict):
    """Build one teacher-feature cache per group of runs whose teachers and crops agree."""

    #: fixed augmentations per image (the runs get ``augment.views`` = this).
    views: int = Field(ge=1)
    batch_size: int = Field(16, ge=1)


class FidelityEval(Strict):
    #: held-out images from the recipe's ``eval.source``.
    images: int = Field(4, ge=1)
    #: student resolutions (default: the first training resolution).
    resolutions: Optional[list[int]] = None


class LabelledEval(Strict):
    #: image folder with one sub-folder per class; split into train/test by ``test_fraction``.
    data: str
    test_fraction: float = Field(0.3, gt=0, lt=1)
    #: teacher head whose summary is the embedding (default: backbone for kNN; the CLIP-like
    #: teacher for zero-shot).
    head: Optional[str] = None
    max_per_class: Optional[int] = Field(None, ge=1)


class KnnEval(LabelledEval):
    k: int = Field(20, ge=1)


class SweepEval(Strict):
    """Evaluation run in the sweep process after each run finished (radio_core.eval)."""

    fidelity: Union[bool, FidelityEval] = False
    knn: Optional[KnnEval] = None
    zeroshot: Optional[LabelledEval] = None

    @property
    def fidelity_spec(self) -> Optional[FidelityEval]:
        if self.fidelity is True:
            return FidelityEval()
        return self.fidelity or None

    @property
    def enabled(self) -> bool:
        return bool(self.fidelity_spec or self.knn or self.zeroshot)


class SweepSpec(Strict):
    recipe: str
    output_dir: str
    overrides: list[Override] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    runs: list[RunEntry] = Field(default_factory=list)
    cache: Optional[CacheShare] = None
    eval: SweepEval = Field(default_factory=SweepEval)
    #: command that starts ``-m radio_core.run ...`` (default: this Python interpreter).
    launcher: Optional[list[str]] = None

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            _check_override(f"{key}=x")
            if not values:
                raise ValueError(f"grid axis {key!r} has no values")
        return v

    @model_validator(mode="after")
    def _names(self) -> "SweepSpec":
        names = [r.name for r in self.runs if r.name is not None]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"runs: names {dup} are given more than once")
        return self


def _format_errors(exc: ValidationError, origin: str) -> str:
    from .recipe.loader import _model_at
    from .utils import closest

    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = _model_at(SweepSpec, err["loc"][:-1])
            msg = "unknown key"
            if parent is not None:
                guess = closest(str(err["loc"][-1]), parent.model_fields)
                msg += f" (did you mean {guess!r}?)" if guess else f" (valid keys: {', '.join(parent.model_fields)})"
        elif "input" in err and err["type"] not in ("missing", "value_error"):
            msg += f" (got {err['input']!r})"
        lines.append(f"{origin}: {loc}: {msg}")
    return "\n".join(lines)


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"sweep file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file must be a mapping, got {type(data).__name__}")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepError(_format_errors(exc, str(path))) from None
    if not (path.parent / spec.recipe).is_file():
        raise SweepError(f"{path}: recipe: base recipe {spec.recipe!r} not found (looked for "
                         f"{(path.parent / spec.recipe).resolve()}; the path is relative to the sweep file)")
    return spec


# ---------------------------------------------------------------------------------------
# planning: names, overrides, resolved recipes, cache keys


@dataclass
class PlannedRun:
    name: str
    #: the overrides that distinguish this run (as written in the sweep file).
    overrides: list[str]
    #: sweep-wide + run overrides with '*' expanded: what radio_core.run receives.
    resolved_overrides: list[str]
    run_dir: Path
    recipe: Optional[Recipe] = None
    #: why the run cannot start (invalid overrides); it is then recorded as failed.
    error: Optional[str] = None
    cache_key: Optional[str] = None
    cache_identity: dict = field(default_factory=dict)


def override_string(key: str, value: Any) -> str:
    """``key=value`` with the value written so that YAML reads it back unchanged."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        text = value if same else json.dumps(value)
    else:
        text = json.dumps(value)  # JSON is YAML: numbers, booleans, null, lists, mappings
    return f"{key}={text}"


def slug(text: str) -> str:
    """Filesystem-safe on Linux, macOS and Windows; readable (Hydra-style ``key=value,...``)."""
    text = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text)
    return text.strip("_.") or "run"


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix (at least two parts) that no other key shares."""
    def parts(k: str) -> list[str]:
        return [p for p in k.split(".") if p != "*"] or [k]

    out = {}
    for k in keys:
        p = parts(k)
        for n in range(min(2, len(p)), len(p) + 1):
            cand = ".".join(p[-n:])
            if all(o == k or not ".".join(parts(o)).endswith(cand) for o in keys):
                break
        out[k] = cand
    return out


def derive_name(overrides: Sequence[str], short: dict[str, str]) -> str:
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{short.get(key, key)}={value}")
    name = slug(",".join(parts)) if parts else "base"
    if len(name) > MAX_NAME:  # stays unique and stable: the hash is of the full overrides
        name = name[:MAX_NAME - 9] + "-" + hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    return name


def expand_wildcards(data: dict, item: str) -> list[str]:
    """``teachers.*.summary_loss.name=mse`` -> one override per key under ``teachers``."""
    key, _, value = item.partition("=")
    parts = key.split(".")
    if "*" not in parts:
        return [item]
    found: list[str] = []

    def walk(node: Any, i: int, prefix: list[str]) -> None:
        if i == len(parts):
            found.append(".".join(prefix))
            return
        if parts[i] == "*":
            for k in node if isinstance(node, dict) else {}:
                walk(node[k], i + 1, prefix + [str(k)])
        else:
            walk(node.get(parts[i]) if isinstance(node, dict) else None, i + 1, prefix + [parts[i]])

    walk(data, 0, [])
    if not found:
        raise RecipeError(f"override {item!r}: '*' matches no key (at {'.'.join(parts[:parts.index('*')])})")
    return [f"{k}={value}" for k in found]


def resolve_overrides(base: dict, overrides: Sequence[str], source: str) -> tuple[dict, list[str]]:
    """Apply overrides one by one (a wildcard sees the keys earlier overrides created)."""
    data, resolved = base, []
    for item in overrides:
        expanded = expand_wildcards(data, item)
        data = apply_overrides(data, expanded, source)
        resolved += expanded
    return data, resolved


def cache_identity(recipe: Recipe, views: int) -> dict:
    """What determines teacher targets: teachers (plugin, weights args, resolution), data,
    augmentation, seed and crop size. Losses and weights do not, so loss ablations share."""
    def res(v: Any) -> Any:
        return [list(x) for x in v] if v else None

    return {
        "teachers": {n: {"plugin": t.plugin, "args": t.args, "resolution": list(t.resolution) if t.resolution else None}
                     for n, t in sorted(recipe.teachers.items())},
        "data": recipe.data.source.model_dump(mode="json"),
        "augment": {"scale": list(recipe.augment.scale), "ratio": list(recipe.augment.ratio),
                    "hflip": recipe.augment.hflip, "views": views},
        "seed": recipe.train.seed,
        # the crop is the largest teacher/student size unless data.crop_size fixes it
        "crop_size": list(recipe.data.crop_size) if recipe.data.crop_size else None,
        "student_resolution": res(recipe.student.resolution),
        "group_resolutions": {g: res(s.student_resolution) for g, s in sorted((recipe.groups or {}).items())},
        "stage_resolutions": [res(s.student_resolution) for s in recipe.stages or []],
    }


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def plan(spec: SweepSpec, sweep_path: str | Path, output_dir: Optional[str | Path] = None) -> list[PlannedRun]:
    sweep_path = Path(sweep_path)
    out = Path(output_dir or spec.output_dir).absolute()
    base_path = (sweep_path.parent / spec.recipe).resolve()
    try:
        base = load_raw(base_path)
        base, sweep_overrides = resolve_overrides(base, spec.overrides, f"{sweep_path}: overrides")
    except RecipeError as exc:
        raise SweepError(str(exc)) from None

    axes = [[override_string(k, v) for v in values] for k, values in spec.grid.items()]
    entries = spec.runs or [RunEntry()]
    short = _short_keys(list(spec.grid) + [o.partition("=")[0] for e in entries for o in e.overrides])
    runs: list[PlannedRun] = []
    for entry, combo in itertools.product(entries, itertools.product(*axes)):
        overrides = entry.overrides + list(combo)
        if entry.name is None:
            name = derive_name(overrides, short)
        else:
            name = slug(entry.name) + ("," + derive_name(list(combo), short) if combo else "")
        runs.append(PlannedRun(name, overrides, [], out / "runs" / name))

    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:  # two runs slugged alike: keep both, told apart by their overrides
            r.name += "-" + hashlib.sha1("\n".join(r.overrides).encode()).hexdigest()[:8]
            r.run_dir = out / "runs" / r.name

    for r in runs:
        origin = f"{sweep_path} (run {r.name})"
        try:
            data, resolved = resolve_overrides(base, r.overrides, origin)
            r.recipe = validate(apply_overrides(data, [override_string("output_dir", str(r.run_dir))]), origin=origin)
            r.resolved_overrides = sweep_overrides + resolved
        except RecipeError as exc:
            r.error = str(exc)
            continue
        if spec.cache is not None:
            r.cache_identity = cache_identity(r.recipe, spec.cache.views)
            r.cache_key = identity_key(r.cache_identity)
            r.recipe = validate(apply_overrides(r.recipe.model_dump(mode="json"), [
                override_string("cache.path", str(out / "cache" / r.cache_key)),
                f"augment.views={spec.cache.views}"]), origin=origin)
    return runs


# ---------------------------------------------------------------------------------------
# run directory state


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # a kill never leaves half a file


def completed_step(run_dir: Path) -> int:
    """Step of the newest complete checkpoint (0 if none)."""
    ckpts = run_dir / "checkpoints"
    steps = [int(p.name[len("step_"):]) for p in ckpts.glob("step_*")
             if p.is_dir() and p.name[len("step_"):].isdigit() and (p / "trainer_state.json").is_file()] \
        if ckpts.is_dir() else []
    return max(steps, default=0)


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
    old = _flatten(yaml.safe_load(old_path.read_text()))
    new = _flatten(run.recipe.model_dump(mode="json"))
    # Keys only one side has are schema changes (a radio-distill upgrade), not a different run.
    diff = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if not diff:
        return None
    return (f"{run.run_dir} holds a run of a different recipe (changed: {', '.join(diff[:6])}); "
            "the base recipe or sweep overrides changed since it started: remove the directory to rerun it")


def tail_lines(path: Path, n: int = 40) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    lines = [l for l in re.split(r"[\r\n]+", text) if l.strip()]
    return lines[-n:]


def last_logged_step(metrics: Path) -> Optional[int]:
    """Step of the last complete line of a metrics.jsonl, reading only its end."""
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


# ---------------------------------------------------------------------------------------
# evaluation after a run


_LABELLED: dict[tuple, Any] = {}


def _labelled(spec: LabelledEval):
    """Read (and remember across runs) a labelled folder and its train/test split."""
    key = (spec.data, spec.max_per_class, spec.test_fraction)
    if key not in _LABELLED:
        from .eval.__main__ import split_labelled
        from .eval.tasks import read_class_folder

        images, labels, classes = read_class_folder(spec.data, spec.max_per_class)
        _LABELLED[key] = (*split_labelled(images, labels, spec.test_fraction), classes)
    return _LABELLED[key]


def evaluate(run_dir: Path, spec: SweepEval) -> dict[str, float]:
    from .eval.loading import load_run

    fid = spec.fidelity_spec
    run = load_run(run_dir, with_teachers=bool(fid or spec.zeroshot))
    res = tuple(run.recipe.student.resolution[0])
    out: dict[str, float] = {}
    if fid:
        from .eval.report import eval_images
        from .eval.tasks import fidelity

        results = fidelity(run.distiller, run.teachers, eval_images(run, fid.images), fid.resolutions or [res[0]])
        out.update({f"fidelity/{r}/{head}/{m}": v for r, row in results.items()
                    for head, ms in row.items() for m, v in ms.items()})
    if spec.knn:
        from .eval.tasks import knn

        train, test, classes = _labelled(spec.knn)
        acc = knn(run.distiller, train, test, len(classes), res, head=spec.knn.head, k=spec.knn.k)
        out.update({f"knn/{k}": v for k, v in acc.items()})
    if spec.zeroshot:
        from .eval.tasks import zero_shot

        train, test, classes = _labelled(spec.zeroshot)
        head = spec.zeroshot.head or next((n for n, t in run.teachers.items() if hasattr(t, "encode_text")), None)
        if head is None:
            raise ValueError("eval.zeroshot: no teacher has a text tower (encode_text); "
                             "name one with eval.zeroshot.head")
        acc = zero_shot(run.distiller, run.teachers[head], head, test[0], test[1], classes, res)
        out.update({f"zeroshot/{k}": v for k, v in acc.items()})
    return out


# ---------------------------------------------------------------------------------------
# execution


def _parent_death_signal() -> Any:
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


class Sweep:
    def __init__(self, spec: SweepSpec, sweep_path: str | Path, output_dir: Optional[str | Path] = None,
                 progress: bool = True) -> None:
        self.spec, self.sweep_path = spec, Path(sweep_path)
        self.out = Path(output_dir or spec.output_dir).absolute()
        self.base_recipe = (self.sweep_path.parent / spec.recipe).resolve()
        self.runs = plan(spec, sweep_path, self.out)
        self.progress = progress
        self.child: Optional[subprocess.Popen] = None
        self.stop_signal: Optional[int] = None
        self._failed_caches: dict[str, str] = {}
        self._bar: Any = None

    # ------------------------------------------------------------------ selection
    def select(self, only: Optional[Sequence[str]]) -> list[PlannedRun]:
        if not only:
            return list(self.runs)
        chosen = [r for r in self.runs if any(fnmatch.fnmatchcase(r.name, pat) for pat in only)]
        if not chosen:
            raise SweepError(f"--only {' '.join(only)}: no run matches; runs are: "
                             + ", ".join(r.name for r in self.runs))
        return chosen

    def command(self, run: PlannedRun, resume: bool) -> list[str]:
        launcher = self.spec.launcher or [sys.executable]
        extra = [override_string("output_dir", str(run.run_dir))]
        if run.cache_key is not None:
            extra += [override_string("cache.path", str(self.out / "cache" / run.cache_key)),
                      f"augment.views={self.spec.cache.views}"]
        return [*launcher, "-m", "radio_core.run", str(self.base_recipe), *run.resolved_overrides, *extra] \
            + (["--resume"] if resume else [])

    def state_of(self, run: PlannedRun) -> str:
        if run.error:
            return "invalid"
        marker = read_json(run.run_dir / DONE_MARKER)
        if marker is not None:
            return "done" if marker.get("eval_spec") == self.spec.eval.model_dump(mode="json") else "evaluate"
        if (read_json(run.run_dir / RUN_STATE) or {}).get("trained"):
            return "evaluate"
        step = completed_step(run.run_dir)
        return f"resume from step {step}" if step else "new"

    def log_event(self, event: str, **fields: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LAUNCH_LOG, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
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
    def run(self, only: Optional[Sequence[str]] = None) -> int:
        from tqdm.auto import tqdm

        selected = self.select(only)
        self.out.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        tqdm.monitor_interval = 0  # no monitor thread: runs are started with fork + exec
        self._bar = tqdm(total=len(selected), desc="sweep", unit="run", disable=not self.progress,
                         dynamic_ncols=True)
        try:
            for run in selected:
                if self.stop_signal is not None:
                    break
                self._bar.set_postfix_str(run.name[:40])
                status = self._execute(run)
                self._bar.write(f"{run.name}: {status}")
                self._bar.update(1)
        except SweepInterrupted:
            self._bar.write("sweep interrupted: re-launch the same command to continue")
        finally:
            self._bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        rows = self.write_results()
        lock.close()
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        return 0 if all(r["status"] == "ok" for r in rows if r["name"] in {x.name for x in selected}) else 1

    def _lock(self):
        lock = open(self.out / ".sweep.lock", "a+")
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no protection against two sweeps in one directory
            pass
        except OSError:
            lock.close()
            raise SweepError(f"output_dir: another sweep is running in {self.out}") from None
        return lock

    def _record(self, run: PlannedRun, **fields: Any) -> dict:
        state = read_json(run.run_dir / RUN_STATE) or {"name": run.name, "overrides": run.overrides, "attempts": []}
        state.update(fields)
        write_json(run.run_dir / RUN_STATE, state)
        return state

    def _execute(self, run: PlannedRun) -> str:
        state = self.state_of(run)
        if state == "invalid":
            run.run_dir.mkdir(parents=True, exist_ok=True)
            self._record(run, status="failed", error=run.error, resolved_overrides=[])
            self.log_event("invalid", run=run.name, error=run.error)
            return f"failed: {run.error}"
        if state == "done":
            self.log_event("skip", run=run.name)
            return "done already (skipped)"
        conflict = snapshot_conflict(run)
        if conflict:
            self._record(run, status="failed", error=conflict)
            self.log_event("conflict", run=run.name, error=conflict)
            return f"failed: {conflict}"

        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / DONE_MARKER).unlink(missing_ok=True)
        (run.run_dir / SNAPSHOT).write_text(dump_recipe(run.recipe))
        self._record(run, overrides=run.overrides, resolved_overrides=run.resolved_overrides,
                     base_recipe=str(self.base_recipe), status="running", error=None)
        if state != "evaluate":
            failure = self._train(run)
            if failure is not None:
                return failure
        if self.spec.eval.enabled:
            self._bar.set_postfix_str(f"{run.name[:40]} evaluating")
            t0 = time.perf_counter()
            try:
                results = evaluate(run.run_dir, self.spec.eval)
            except SweepInterrupted:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken evaluation fails this run only
                error = f"evaluation: {type(exc).__name__}: {exc}"
                self._record(run, status="failed", error=error)
                self.log_event("eval_failed", run=run.name, error=error)
                return f"failed: {error}"
            eval_s = time.perf_counter() - t0
        else:
            results, eval_s = {}, 0.0
        state_now = self._record(run, status="ok", error=None, eval=results, eval_s=eval_s)
        wall = sum(a.get("wall_s", 0) for a in state_now["attempts"]) + eval_s
        # Written last: its presence means training and evaluation both completed.
        write_json(run.run_dir / DONE_MARKER, {"eval_spec": self.spec.eval.model_dump(mode="json"), "eval": results,
                                               "wall_s": wall, "time": time.time()})
        return "ok"

    def _train(self, run: PlannedRun) -> Optional[str]:
        """Train (or resume) the run in a subprocess; returns a failure/interruption message or None."""
        if run.cache_key is not None:
            problem = self._ensure_cache(run)
            if problem:
                self._record(run, status="failed", error=problem)
                return f"failed: {problem}"
        resume = completed_step(run.run_dir) > 0
        cmd = self.command(run, resume)
        logs = run.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        # Counted from the log files: a killed sweep never recorded its last attempt's exit.
        attempt = 1 + max((int(p.stem.split("_")[1]) for p in logs.glob("attempt_*.stdout")
                           if p.stem.split("_")[1].isdigit()), default=0)
        out_path, err_path = logs / f"attempt_{attempt}.stdout", logs / f"attempt_{attempt}.stderr"
        self.log_event("launch", run=run.name, attempt=attempt, resume=resume, command=cmd)
        t0 = time.perf_counter()
        with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.child = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL, env=env,
                                          preexec_fn=_parent_death_signal())
            try:
                rc = self._wait(run)
            finally:
                self.child = None
        wall = time.perf_counter() - t0
        done = completed_step(run.run_dir) >= run.recipe.train.steps
        if rc == 0 and done:
            status, error = "trained", None
        elif self.stop_signal is not None:
            status, error = "interrupted", f"stopped at step {completed_step(run.run_dir)} by the sweep's signal"
        elif rc == 0:
            status, error = "interrupted", (f"the run exited at step {completed_step(run.run_dir)} of "
                                            f"{run.recipe.train.steps} (stop signal); it resumes on relaunch")
        else:
            tail = tail_lines(err_path)
            (run.run_dir / "stderr_tail.txt").write_text("\n".join(tail) + "\n")
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            status, error = "failed", f"{how}: {error_line(tail)}".rstrip(": ")
        state = read_json(run.run_dir / RUN_STATE) or {}
        attempts = state.get("attempts", []) + [{"attempt": attempt, "resumed": resume, "rc": rc,
                                                 "wall_s": wall, "status": status}]
        self._record(run, attempts=attempts, status="running" if status == "trained" else status, error=error,
                     trained=status == "trained")
        self.log_event("exit", run=run.name, attempt=attempt, rc=rc, status=status, wall_s=wall)
        if status == "trained":
            return None
        return f"{status}: {error}"

    def _wait(self, run: PlannedRun) -> int:
        """Wait for the run, showing its step (from the end of its metrics.jsonl)."""
        metrics = run.run_dir / "metrics.jsonl"
        shown = None
        while True:
            try:
                return self.child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                step = last_logged_step(metrics)
                if step is not None and step != shown:
                    self._bar.set_postfix_str(f"{run.name[:40]} step {step}/{run.recipe.train.steps}")
                    shown = step

    def _ensure_cache(self, run: PlannedRun) -> Optional[str]:
        key = run.cache_key
        path = self.out / "cache" / key
        if key in self._failed_caches:
            return self._failed_caches[key]
        if (path / "index.json").is_file():
            return None
        from .data.cache import build_cache
        from .registry import get_registry

        self._bar.set_postfix_str(f"{run.name[:40]} building teacher-feature cache {key}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path.parent / f"{key}.json", run.cache_identity)  # what the key stands for
        t0 = time.perf_counter()
        recipe = run.recipe.model_copy(update={"cache": None})
        try:
            build_cache(recipe, get_registry(), path, self.spec.cache.views, self.spec.cache.batch_size,
                        progress=False)
        except SweepInterrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - the runs that need it fail; the others go on
            self._failed_caches[key] = f"teacher-feature cache {key}: {type(exc).__name__}: {exc}"
            self.log_event("cache_failed", key=key, error=self._failed_caches[key])
            return self._failed_caches[key]
        self.log_event("cache_built", key=key, path=str(path), wall_s=time.perf_counter() - t0)
        return None

    # ------------------------------------------------------------------ results
    def collect(self) -> list[dict[str, Any]]:
        rows = []
        for run in self.runs:
            row: dict[str, Any] = {"name": run.name, "overrides": " ".join(run.overrides)}
            state = read_json(run.run_dir / RUN_STATE) or {}
            marker = read_json(run.run_dir / DONE_MARKER)
            if run.error:
                row.update(status="failed", error=run.error)
            elif marker is not None:
                row.update(status="ok")
            else:
                row.update(status=state.get("status") if state.get("status") not in (None, "running") else "pending",
                           error=state.get("error"))
            lines = read_metrics(run.run_dir / "metrics.jsonl")
            if lines:
                last = lines[-1]
                row.update({k: v for k, v in last.items() if k.startswith("loss/")})
                logged_fidelity = next((l for l in reversed(lines) if any(k.startswith("fidelity/") for k in l)), {})
                row.update({k: v for k, v in logged_fidelity.items() if k.startswith("fidelity/")})
                speeds = [l["images_per_s"] for l in lines[1:] or lines if "images_per_s" in l]
                if speeds:  # median: the first logged steps include start-up
                    row["images_per_s"] = statistics.median(speeds)
            if marker is not None:
                row.update(marker.get("eval", {}))
                row["wall_s"] = marker.get("wall_s")
            elif state.get("attempts"):
                row["wall_s"] = sum(a.get("wall_s", 0) for a in state["attempts"])
            rows.append(row)
        return rows

    def write_results(self) -> list[dict[str, Any]]:
        rows = self.collect()
        columns = result_columns(rows)
        with open(self.out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns + ["error"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        table = markdown_table(rows, [c for c in columns if not c.endswith("/rel_mse")])
        (self.out / "results.md").write_text(table + "\n")
        save_plots(rows, [c for c in columns if c not in ("name", "overrides", "status")
                          and not c.endswith("/rel_mse")], self.out / "plots")
        print(table)
        return rows


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in tail_lines(path, 10**9):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return out


def result_columns(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r}

    def group(prefix: str) -> list[str]:
        return sorted(k for k in keys if k.startswith(prefix) and k != "loss/total")

    return (["name", "status", "overrides"] + (["loss/total"] if "loss/total" in keys else [])
            + group("loss/") + group("fidelity/") + group("knn/") + group("zeroshot/")
            + [k for k in ("images_per_s", "wall_s") if k in keys])


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += [""] + [f"* {r['name']} ({r['status']}): {r['error']}" for r in failed]
    return "\n".join(lines)


def save_plots(rows: list[dict], metrics: list[str], out_dir: Path) -> list[Path]:
    """One bar chart per metric, one bar per run (runs without the value are left empty)."""
    from .eval.pictures import pyplot, save_figure

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = [r["name"] for r in rows]
    for metric in metrics:
        values = [r.get(metric) if isinstance(r.get(metric), (int, float)) else math.nan for r in rows]
        if all(math.isnan(v) for v in values):
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.6))
        bars = ax.bar(range(len(rows)), [0 if math.isnan(v) else v for v in values], color="tab:blue")
        for bar, v, r in zip(bars, values, rows):
            ax.annotate("n/a" if math.isnan(v) else f"{v:.4g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
            if r["status"] != "ok":
                bar.set_color("tab:gray")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        paths.append(save_figure(fig, out_dir / f"{slug(metric.replace('/', '_'))}.png"))
    return paths


# ---------------------------------------------------------------------------------------
# command line


def dry_run(sweep: Sweep, selected: list[PlannedRun]) -> int:
    from .plan.checks import check_recipe
    from .registry import PluginError, get_registry

    registry = get_registry()
    bad = 0
    for run in selected:
        state = sweep.state_of(run)
        if run.recipe is not None:
            try:
                check_recipe(run.recipe, registry, origin=f"{sweep.sweep_path} (run {run.name})")
            except (RecipeError, PluginError) as exc:
                run.error, state = str(exc), "invalid"
            except Exception as exc:  # noqa: BLE001 - a plugin's own error: report it, go on listing
                run.error, state = f"{type(exc).__name__}: {exc}", "invalid"
        print(f"{run.name}: {state}")
        if run.error:
            bad += 1
            print("  " + run.error.replace("\n", "\n  "))
            continue
        if run.cache_key:
            print(f"  cache {run.cache_key}")
        print("  " + shlex.join(sweep.command(run, completed_step(run.run_dir) > 0)))
    keys = {r.cache_key for r in selected if r.cache_key}
    print(f"{len(selected)} run(s), {bad} invalid, {len(keys)} teacher-feature cache(s); output in {sweep.out}")
    return 1 if bad else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="radio_core.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only runs whose name matches (glob; repeatable); the table lists all")
    p.add_argument("--dry-run", action="store_true", help="list runs, their state and commands; launch nothing")
    p.add_argument("--output-dir", help="override the sweep's output_dir")
    p.add_argument("--no-cache", action="store_true",
                   help="ignore the sweep's cache section: every run computes teacher targets online")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        spec = load_sweep(args.sweep)
        if args.no_cache:
            spec = spec.model_copy(update={"cache": None})
        sweep = Sweep(spec, args.sweep, args.output_dir, progress=not args.no_progress)
        if args.dry_run:
            return dry_run(sweep, sweep.select(args.only))
        return sweep.run(args.only)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
