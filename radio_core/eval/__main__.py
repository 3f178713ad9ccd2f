"""python -m radio_core.eval RUN_DIR TASK [options]

Tasks:
  report                      report.md + PNGs (loss curves, fidelity table, PCA maps, sweep)
  fidelity [--resolutions]    cosine / relative MSE of each head against its teacher
  sweep [--resolutions]       fidelity across student resolutions, plotted (mode-switching probe)
  knn --data DIR              kNN top-1/top-5 on an image-folder dataset (one folder per class)
  zeroshot --data DIR         zero-shot top-1/top-5 through the CLIP head + CLIP text tower
  segment --data DIR --classes N   linear-probe segmentation mIoU (ADE20K layout)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0; 2 for a run, file or argument that cannot be used (one ``error:`` line);
    1 for an internal error (RADIO_TRACEBACK=1 shows its traceback)."""
    import os

    from ..utils import bounded_message

    try:
        return _main(argv)
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


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="radio_core.eval", description=__doc__,
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
        if args.task == "knn":
            print(json.dumps(knn(run.distiller, train, test, len(classes), res, head=args.head)))
        else:
            head = args.head or next((n for n, t in run.teachers.items() if hasattr(t, "encode_text")), None)
            if head is None:
                p.error("zeroshot needs a teacher with a text tower (encode_text), e.g. a clip teacher")
            print(json.dumps(zero_shot(run.distiller, run.teachers[head], head, test[0], test[1], classes, res)))
        return 0
    if args.task == "segment":
        from .tasks import linear_probe_segmentation

        if not args.classes:
            p.error("segment needs --classes")
        result = linear_probe_segmentation(run.distiller, args.data, args.classes, res, head=args.head,
                                           epochs=args.epochs)
        print(json.dumps({k: v for k, v in result.items() if k != "per_class_iou"}))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
