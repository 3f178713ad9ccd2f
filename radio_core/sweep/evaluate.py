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


def evaluate(run_dir: Path, spec: SweepEval) -> dict[str, float]:
    from ..eval.ladder import run_task
    from ..eval.loading import load_run

    tasks = spec.tasks()
    run = load_run(run_dir, with_teachers=any(name not in _NO_TEACHERS for name, _ in tasks))
    first = run.recipe.student.resolution[0][0]
    out: dict[str, float] = {}
    for name, options in tasks:
        ladder = {k: options[k] for k in LADDER_KEYS if k in options}
        args = {k: v for k, v in options.items() if k not in LADDER_KEYS}
        resolutions = ladder.get("resolutions") or [first]
        data_options = {k: ladder[k] for k in ("test_fraction", "max_per_class", "max_images", "reduce_zero_label")
                        if k in ladder}
        if "classes" in ladder:
            data_options["mask_classes"] = ladder["classes"]
        result = run_task(run_dir, name, ladder.get("data"), resolutions, head=ladder.get("head"), args=args,
                          data_options=data_options, loaded=run)
        with_res = name == "fidelity" or len(resolutions) > 1
        for row in result["rows"]:
            for metric in result["scores"]:
                value = row.get(metric)
                if isinstance(value, float):
                    out[f"{name}/{row['resolution'][0]}/{metric}" if with_res else f"{name}/{metric}"] = value
    return out
