"""Evaluation of a finished run (radio_core.eval): the numbers its row in the tables shows."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .spec import LabelledEval, SweepEval

_LABELLED: dict[tuple, Any] = {}


def _labelled(spec: LabelledEval):
    """Read (and remember across runs) a labelled folder and its train/test split."""
    key = (spec.data, spec.max_per_class, spec.test_fraction)
    if key not in _LABELLED:
        from ..eval.__main__ import split_labelled
        from ..eval.tasks import read_class_folder

        images, labels, classes = read_class_folder(spec.data, spec.max_per_class)
        _LABELLED[key] = (*split_labelled(images, labels, spec.test_fraction), classes)
    return _LABELLED[key]


def evaluate(run_dir: Path, spec: SweepEval) -> dict[str, float]:
    from ..eval.loading import load_run

    fid = spec.fidelity_spec
    run = load_run(run_dir, with_teachers=bool(fid or spec.zeroshot))
    res = tuple(run.recipe.student.resolution[0])
    out: dict[str, float] = {}
    if fid:
        from ..eval.report import eval_images
        from ..eval.tasks import fidelity

        results = fidelity(run.distiller, run.teachers, eval_images(run, fid.images), fid.resolutions or [res[0]])
        out.update({f"fidelity/{r}/{head}/{m}": v for r, row in results.items()
                    for head, ms in row.items() for m, v in ms.items()})
    if spec.knn:
        from ..eval.tasks import knn

        train, test, classes = _labelled(spec.knn)
        acc = knn(run.distiller, train, test, len(classes), res, head=spec.knn.head, k=spec.knn.k)
        out.update({f"knn/{k}": v for k, v in acc.items()})
    if spec.zeroshot:
        from ..eval.tasks import zero_shot

        train, test, classes = _labelled(spec.zeroshot)
        head = spec.zeroshot.head or next((n for n, t in run.teachers.items() if hasattr(t, "encode_text")), None)
        if head is None:
            raise ValueError("eval.zeroshot: no teacher has a text tower (encode_text); "
                             "name one with eval.zeroshot.head")
        acc = zero_shot(run.distiller, run.teachers[head], head, test[0], test[1], classes, res)
        out.update({f"zeroshot/{k}": v for k, v in acc.items()})
    return out
