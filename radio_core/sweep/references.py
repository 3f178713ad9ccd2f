"""Reference rows of a sweep: what every arm is measured against. The sweep's own evaluators,
run once on the subjects that do not depend on the arm - each teacher at its own resolution,
raw pixels, the student's architecture at random initialisation (one per seed of the reference
arm's finished runs) - plus the evaluators' chance levels. Kept in ``references.json`` beside
the tables, written atomically by the sweep's main process under the sweep lock, and extended
(never recomputed) as more runs of the reference arm finish."""
from __future__ import annotations

from typing import Any

from .evaluate import flatten, task_options
from .grid import PlannedRun
from .state import DONE_MARKER, read_json, write_json

FILE = "references.json"


def load(sweep: Any) -> dict[str, dict]:
    return (read_json(sweep.out / FILE) or {}).get("rows", {})


def update(sweep: Any, log=print) -> dict[str, dict]:
    """Bring ``references.json`` up to date with the finished runs of the reference arm."""
    spec = sweep.spec.references
    path = sweep.out / FILE
    state = read_json(path) or {}
    if spec is None:
        return state.get("rows", {})
    arm_runs = [r for r in sweep.runs if r.arm == spec.arm]
    eval_spec = sweep.eval_of(arm_runs[0]).model_dump(mode="json")
    if state.get("eval_spec") != eval_spec or state.get("references") != spec.model_dump(mode="json"):
        state = {"eval_spec": eval_spec, "references": spec.model_dump(mode="json"), "rows": {}, "done": []}
    done_runs = [r for r in arm_runs if read_json(r.run_dir / DONE_MARKER) is not None]
    todo = [r for r in done_runs if r.name not in state["done"]]
    if not todo:
        return state["rows"]
    rows = state["rows"]
    for i, run in enumerate(todo):
        first = not state["done"] and i == 0
        log(f"references: scoring {'teachers, baselines and ' if first else ''}the random-init student of {run.name}")
        _score(sweep, run, rows, with_fixed=first, spec=spec)
        state["done"].append(run.name)
        write_json(path, state)  # after each run: an interrupted update keeps what it did
    return rows


def _score(sweep: Any, run: PlannedRun, rows: dict[str, dict], with_fixed: bool, spec: Any) -> None:
    from ..eval.loading import load_run
    from ..eval.subjects import PixelSubject, TeacherSubject, random_student
    from ..registry import get_registry
    from ..eval.data import open_data

    loaded = load_run(run.run_dir, with_teachers=True)
    seed = loaded.recipe.train.seed
    registry = get_registry()
    for name, options in sweep.eval_of(run).tasks():
        ladder, args, resolutions, data_options = task_options(name, options, loaded.recipe)
        evaluator = registry.build("evaluator", name, **args)
        data = open_data(ladder["data"], **data_options) if ladder.get("data") else None
        scores = list(getattr(evaluator, "scores", None) or [])
        subjects = []
        if with_fixed:
            if spec.teachers:
                subjects += [("teacher/" + n, TeacherSubject(n, t, run=loaded)) for n, t in loaded.teachers.items()]
            if "pixels" in spec.baselines:
                patch = getattr(loaded.distiller.student, "patch_size", 16)
                subjects += [("pixels", PixelSubject(r, patch, run=loaded)) for r in resolutions]
            chance = getattr(evaluator, "chance", None) or {}
            for r in resolutions:
                row = {"resolution": [r, r], **{k: float(v) for k, v in chance.items()}}
                rows.setdefault("chance", {}).update(flatten(name, resolutions, row, list(chance)))
        if "random" in spec.baselines:
            subjects += [("random", random_student(loaded, r, seed=seed)) for r in resolutions]
        for row_name, subject in subjects:
            result = {"resolution": list(subject.resolution), **evaluator(subject, data)}
            keys = scores or [k for k, v in result.items() if isinstance(v, float) and not k.startswith("se_")]
            values = flatten(name, resolutions, result, keys)
            if row_name == "random":  # one value per seed
                for k, v in values.items():
                    rows.setdefault("random", {}).setdefault(k, {})[str(seed)] = v
            else:
                rows.setdefault(row_name, {}).update(values)
