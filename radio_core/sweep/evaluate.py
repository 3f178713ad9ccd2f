"""Evaluation of a finished run (radio_core.eval): the numbers its row in the tables shows.

Every entry of the sweep file's ``eval:`` section is a registered evaluator run through the
evaluation ladder on the run's student, at the first training resolution unless the entry lists
``resolutions``. Keys: ``<task>/<metric>``, or ``<task>/<resolution>/<metric>`` for fidelity and
for entries with several resolutions (``fidelity/<res>/<teacher>/<head>/<metric>``)."""
from __future__ import annotations

from pathlib import Path

from .spec import LADDER_KEYS, SweepEval

#: evaluators that need no teachers; any other (fidelity, zero-shot, a third party's) gets them
_NO_TEACHERS = {"knn", "linear", "seg"}


def task_options(name: str, options: dict, recipe) -> tuple[dict, dict, list[int], dict]:
    """(ladder options, evaluator arguments, resolutions, data options) of one ``eval:`` entry."""
    ladder = {k: options[k] for k in LADDER_KEYS if k in options}
    args = {k: v for k, v in options.items() if k not in LADDER_KEYS}
    resolutions = ladder.get("resolutions") or [recipe.student.resolution[0][0]]
    data_options = {k: ladder[k] for k in ("test_fraction", "max_per_class", "max_images", "reduce_zero_label")
                    if k in ladder}
    if "classes" in ladder:
        data_options["mask_classes"] = ladder["classes"]
    return ladder, args, resolutions, data_options


def flatten(name: str, resolutions: list[int], row: dict, scores: list[str]) -> dict[str, float]:
    """One ladder row as sweep columns: ``<task>/<metric>``, or ``<task>/<resolution>/<metric>``
    (fidelity, and entries with several resolutions). A metric's test-set standard error, when
    the evaluator gives one as ``se_<metric>``, comes along."""
    with_res = name == "fidelity" or len(resolutions) > 1
    prefix = f"{name}/{row['resolution'][0]}/" if with_res else f"{name}/"
    return {prefix + k: row[k] for m in scores for k in (m, f"se_{m}") if isinstance(row.get(k), float)}


def evaluate(run_dir: Path, spec: SweepEval) -> dict[str, float]:
    from ..eval.ladder import run_task
    from ..eval.loading import load_run

    tasks = spec.tasks()
    run = load_run(run_dir, with_teachers=any(name not in _NO_TEACHERS for name, _ in tasks))
    out: dict[str, float] = {}
    for name, options in tasks:
        ladder, args, resolutions, data_options = task_options(name, options, run.recipe)
        result = run_task(run_dir, name, ladder.get("data"), resolutions, head=ladder.get("head"), args=args,
                          data_options=data_options, loaded=run)
        for row in result["rows"]:
            out.update(flatten(name, resolutions, row, result["scores"]))
    return out
