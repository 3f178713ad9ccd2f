"""radio eval RUN_DIR TASK [options]      (also: python -m radio_core.eval)

Tasks:
  report                      report.md + PNGs (loss curves, fidelity table, PCA maps, sweep)
  fidelity [--resolutions]    cosine / relative MSE of each head against its teacher
  sweep [--resolutions]       fidelity across student resolutions, plotted (mode-switching probe)
  knn --data DIR              kNN top-1/top-5 on an image-folder dataset (one folder per class)
  zeroshot --data DIR         zero-shot top-1/top-5 through the CLIP head + CLIP text tower
  segment --data DIR --classes N   linear-probe segmentation mIoU (ADE20K layout; see --reduce-zero-label)

knn / zeroshot / segment print their result with its context (task, head, k, train/test sizes,
classes, resolution) as a table, or one JSON object with --json, and save it to
RUN_DIR/eval/<task>.json (the export's model card lists these).

Segmentation masks: pixel value = class id, 255 = ignore. ADE20K's annotations use 0 for
"other" (not one of its 150 classes) and 1..150 for the classes: pass --reduce-zero-label (and
--classes 150) to map 0 to ignore and shift the rest down by one, as the benchmark does.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Optional, Sequence


def split_labelled(images: list, labels: list, test_fraction: float, seed: int = 0):
    idx = list(range(len(images)))
    random.Random(seed).shuffle(idx)
    n_test = max(1, int(len(idx) * test_fraction))
    test, train = idx[:n_test], idx[n_test:]
    return ([images[i] for i in train], [labels[i] for i in train]), ([images[i] for i in test], [labels[i] for i in test])


def format_result(result: dict) -> str:
    """A two-column table: context first (task, run, head, ...), then the scores."""
    width = max(len(k) for k in result)
    lines = []
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, (list, tuple)) and key == "resolution":
            value = "x".join(str(v) for v in value)
        lines.append(f"{key.ljust(width)}  {value}")
    return "\n".join(lines)


def report_result(result: dict, run_dir: str, as_json: bool) -> None:
    """Print ``result`` (table or JSON) and save it under RUN_DIR/eval/<task>.json."""
    out = Path(run_dir) / "eval" / f"{result['task']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result) if as_json else format_result(result) + f"\n(saved to {out})")


def main(argv: Optional[Sequence[str]] = None, prog: str = "radio_core.eval") -> int:
    """Exit status 0; 2 for a run, file or argument that cannot be used (one ``error:`` line);
    1 for an internal error (RADIO_TRACEBACK=1 shows its traceback)."""
    import os

    from ..utils import bounded_message

    try:
        return _main(argv, prog)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, LookupError, OSError) as exc:  # RecipeError, PluginError, WeightsError, missing files
        print(f"error: {bounded_message(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if os.environ.get("RADIO_TRACEBACK"):
            raise
        print(f"error: internal error: {type(exc).__name__}: {bounded_message(str(exc))}", file=sys.stderr)
        return 1


def _main(argv: Optional[Sequence[str]] = None, prog: str = "radio_core.eval") -> int:
    from ..utils import OneLineParser

    p = OneLineParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run's output_dir (recipe.yaml + export/ or checkpoints/)")
    p.add_argument("task", choices=["report", "fidelity", "sweep", "knn", "zeroshot", "segment"])
    p.add_argument("--resolutions", type=int, nargs="*", help="student resolutions (px)")
    p.add_argument("--data", help="dataset folder for knn / zeroshot / segment")
    p.add_argument("--test-fraction", type=float, default=0.3, help="knn/zeroshot: held-out share of --data")
    p.add_argument("--head", default=None, help="teacher head whose features to use (default: backbone; "
                                                "zeroshot: the first CLIP-like teacher)")
    p.add_argument("--classes", type=int, help="segment: number of classes")
    p.add_argument("--epochs", type=int, default=20, help="segment: epochs of linear-probe training")
    p.add_argument("--images", type=int, default=4, help="fidelity/report: number of held-out images")
    p.add_argument("--out", help="output folder for pictures (default: RUN_DIR/report)")
    p.add_argument("--k", type=int, default=20, help="knn: neighbours (default 20)")
    p.add_argument("--reduce-zero-label", action="store_true",
                   help="segment: label 0 is 'other' (ADE20K): ignore it and shift classes 1..N down to 0..N-1")
    p.add_argument("--json", action="store_true", help="knn/zeroshot/segment: print one JSON object instead of a table")
    args = p.parse_args(argv)

    from .loading import load_run

    run = load_run(args.run_dir, with_teachers=args.task in ("report", "fidelity", "sweep", "zeroshot"))
    res = tuple(run.recipe.student.resolution[0])
    out_dir = Path(args.out or Path(args.run_dir) / "report")
    if args.task == "report":
        from .report import write_report

        print(f"report written to {write_report(run, out_dir, args.resolutions, args.images)}")
        return 0
    if args.task in ("fidelity", "sweep"):
        from .pictures import save_sweep_plot
        from .report import eval_images, fidelity_table
        from .tasks import fidelity

        resolutions = args.resolutions or ([res[0]] if args.task == "fidelity" else [224, 320, 448, 640, 768, 1024])
        results = fidelity(run.distiller, run.teachers, eval_images(run, args.images), resolutions)
        print(fidelity_table(results))
        if args.task == "sweep":
            out_dir.mkdir(parents=True, exist_ok=True)
            heads = next(iter(results.values()))
            path = save_sweep_plot(list(results), {h: [results[r][h]["cosine"] for r in results] for h in heads},
                                   out_dir / "resolution_sweep.png")
            print(f"plot: {path}")
        return 0
    if not args.data:
        p.error(f"{args.task} needs --data")
    if args.task in ("knn", "zeroshot"):
        from .tasks import knn, read_class_folder, zero_shot

        images, labels, classes = read_class_folder(args.data)
        train, test = split_labelled(images, labels, args.test_fraction)
        context = {"task": args.task, "run": str(args.run_dir), "data": str(args.data)}
        if args.task == "knn":
            scores = knn(run.distiller, train, test, len(classes), res, head=args.head, k=args.k)
            context.update(head=args.head or "backbone", k=args.k)
        else:
            head = args.head or next((n for n, t in run.teachers.items() if hasattr(t, "encode_text")), None)
            if head is None:
                p.error("zeroshot needs a teacher with a text tower (encode_text), e.g. a clip teacher")
            scores = zero_shot(run.distiller, run.teachers[head], head, test[0], test[1], classes, res)
            context.update(head=head)
        context.update(classes=len(classes), train_images=len(train[0]), test_images=len(test[0]),
                       resolution=list(res))
        report_result({**context, **scores}, args.run_dir, args.json)
        return 0
    if args.task == "segment":
        from .tasks import linear_probe_segmentation

        if not args.classes:
            p.error("segment needs --classes")
        result = linear_probe_segmentation(run.distiller, args.data, args.classes, res, head=args.head,
                                           epochs=args.epochs, reduce_zero_label=args.reduce_zero_label)
        context = {"task": "segment", "run": str(args.run_dir), "data": str(args.data),
                   "head": args.head or "backbone", "classes": args.classes,
                   "reduce_zero_label": args.reduce_zero_label, "epochs": args.epochs, "resolution": list(res)}
        scores = {k: v for k, v in result.items() if k != "per_class_iou"}
        report_result({**context, **scores}, args.run_dir, args.json)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
