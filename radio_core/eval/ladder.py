"""The evaluation ladder: one registered evaluator run over a set of subjects - the run's student
at each resolution asked (default: every resolution it trained at), each teacher with
``teachers``, baselines (``pixels``, ``random``) - on the same data through the same protocol;
a table, and a plot of score against student resolution (mode switching shows there)."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional, Sequence

from ..protocols import EvalData, Subject
from ..registry import Registry, get_registry

BASELINES = ("pixels", "random")


def default_resolutions(recipe: Any) -> list[int]:
    """The student's training resolutions (their height), every one of them."""
    return list(dict.fromkeys(int(h) for h, _ in recipe.student_resolutions()))


def accepts(factory: Any, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_data(task: str, needs: Sequence[str], data: EvalData) -> None:
    if "labels" in needs and not data.has_labels:
        raise ValueError(f"{task}: --data {data.source} has no class labels (class sub-folders, a cls/json "
                         f"member per webdataset sample, or a ClassLabel column)")
    if "masks" in needs and not data.has_masks:
        raise ValueError(f"{task}: --data {data.source} has no segmentation masks (ADE20K's images/ + "
                         f"annotations/, a seg.png member per webdataset sample, or a mask Image column)")


def subjects_for(run: Any, resolutions: Sequence[int], teachers: bool, baselines: Sequence[str],
                 head: Optional[str] = None) -> list[Subject]:
    from .subjects import PixelSubject, StudentSubject, TeacherSubject, random_student

    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    out: list[Subject] = [StudentSubject(run.distiller, r, run.teachers, head=head, run=run) for r in resolutions]
    if teachers:
        out += [TeacherSubject(n, t, run=run) for n, t in run.teachers.items()]
    for r in resolutions:
        if "random" in baselines:
            out.append(random_student(run, r, head=head))  # read out the same way as the student
        if "pixels" in baselines:
            out.append(PixelSubject(r, getattr(run.distiller.student, "patch_size", 16), run=run))
    return out


def run_task(run_dir: str | Path, task: str, data: Optional[str] = None, resolutions: Optional[Sequence[int]] = None,
             teachers: bool = False, baselines: Sequence[str] = (), head: Optional[str] = None,
             args: Optional[dict] = None, data_options: Optional[dict] = None, cache: bool = True,
             registry: Optional[Registry] = None, loaded: Any = None) -> dict:
    """Evaluate the run in ``run_dir`` with the evaluator ``task``; returns
    ``{"task", "run", "data", "rows": [{"subject", "kind", "resolution", **result}, ...]}``."""
    from .data import open_data
    from .loading import load_run

    registry = registry or get_registry()
    args = dict(args or {})
    factory = registry.get("evaluator", task).factory
    if cache and accepts(factory, "cache_dir") and "cache_dir" not in args:
        args["cache_dir"] = str(Path(run_dir) / "eval" / "features")
    evaluator = registry.build("evaluator", task, **args)
    needs = tuple(getattr(evaluator, "needs", ("images", "labels")))
    with_teachers = teachers or bool(getattr(evaluator, "needs_teachers", False)) or "text" in needs
    run = loaded or load_run(run_dir, with_teachers=with_teachers)
    eval_data = None
    if data is not None:
        eval_data = open_data(data, **(data_options or {}))
        check_data(task, needs, eval_data)
    elif needs:
        raise ValueError(f"{task} needs --data (an image-folder tree, webdataset shards or a Hugging Face "
                         f"dataset folder)")
    rows = []
    for subject in subjects_for(run, resolutions or default_resolutions(run.recipe), teachers, baselines, head):
        result = evaluator(subject, eval_data)
        rows.append({"subject": subject.name, "kind": subject.kind, "resolution": list(subject.resolution),
                     **({"head": head or "backbone"} if subject.kind != "teacher" and head else {}), **result})
    return {"task": task, "run": str(run_dir), "data": eval_data.source if eval_data else None,
            "scores": list(getattr(evaluator, "scores", None) or score_keys(rows)), "rows": rows}


def score_keys(rows: list[dict]) -> list[str]:
    """The numbers of a result: float values (context is str / int / list)."""
    return list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float)
                              and k not in ("temperature", "lr", "weight_decay")))


def format_table(result: dict) -> str:
    """Context shared by every row first, then one row per subject with its scores."""
    rows, scores = result["rows"], result["scores"]
    shared = {k: v for k, v in rows[0].items() if k not in scores and k not in ("subject", "kind", "resolution")
              and all(r.get(k) == v for r in rows)}
    top = {k: result[k] for k in ("task", "run", "tier") if result.get(k) is not None}
    lines = [f"{k}: {v}" for k, v in {**top, **shared}.items()]
    notes = [f"{r['subject']}: {r['skipped']}" for r in rows if "skipped" in r and "skipped" not in shared]
    head = ["subject", "resolution", *scores]
    table = [[r["subject"], "x".join(map(str, r["resolution"])),
              *[f"{r[s]:.4f}" if isinstance(r.get(s), float) else "-" for s in scores]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    lines += ["", "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines + ([""] + notes if notes else []))


def save_plot(result: dict, path: Path) -> Optional[Path]:
    """Each score against student resolution (one panel per score); teachers at their own
    resolution as horizontal lines, baselines as dashed lines. None with one student resolution."""
    from .pictures import pyplot, save_figure

    students = [r for r in result["rows"] if r["kind"] == "student" and "skipped" not in r]
    if len({r["resolution"][0] for r in students}) < 2 or not result["scores"]:
        return None
    plt = pyplot()
    scores = result["scores"]
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.6), squeeze=False)
    for ax, score in zip(axes[0], scores):
        xs = [r["resolution"][0] for r in students if isinstance(r.get(score), float)]
        ax.plot(xs, [r[score] for r in students if isinstance(r.get(score), float)], marker="o", label="student")
        for r in result["rows"]:
            if r["kind"] == "teacher" and isinstance(r.get(score), float):
                ax.axhline(r[score], linestyle="-", linewidth=1, alpha=0.6, color="grey")
                ax.annotate(f"{r['subject']} @{r['resolution'][0]}", (xs[0], r[score]), fontsize=7, va="bottom")
        base: dict[str, list] = {}
        for r in result["rows"]:
            if r["kind"] == "baseline" and isinstance(r.get(score), float):
                base.setdefault(r["subject"].split("@")[0], []).append((r["resolution"][0], r[score]))
        for name, pts in base.items():
            ax.plot(*zip(*sorted(pts)), linestyle="--", marker=".", label=name)
        ax.set_xlabel("student input resolution (px)")
        ax.set_ylabel(score)
        ax.set_title(f"{result['task']}: {score}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


__all__ = ["run_task", "format_table", "save_plot", "subjects_for", "default_resolutions", "BASELINES"]
