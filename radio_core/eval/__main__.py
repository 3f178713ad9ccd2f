"""radio eval RUN_DIR TASK [options]      (also: python -m radio_core.eval)

Tasks:
  report                      report.md + PNGs (loss curves, fidelity table, PCA maps, sweep)
  sweep [--resolutions]       fidelity across student resolutions, plotted (mode-switching probe)
  EVALUATOR                   any registered evaluator (radio plugins --kind evaluator); built in:
    fidelity                  cosine / relative MSE of each head against its teacher
    knn --data PATH           DINO's weighted kNN, top-1/top-5 (faiss for large sets)
    linear --data PATH        linear probe on the summary features, top-1/top-5
    zeroshot --data PATH      through the CLIP head + the CLIP text tower, open_clip's prompt templates
    seg --data PATH           linear-probe segmentation: mIoU, pixel accuracy, boundary F ("segment" too)

PATH: an image-folder tree (one folder per class; or train/ + val/), ADE20K's images/ +
annotations/, webdataset shards (radio pack output or plain tars with cls / seg.png members) or
a Hugging Face dataset folder (datasets.save_to_disk). The student is scored at every resolution
it trained at (or --resolutions), each teacher too with --teachers, baselines with --baselines;
features are cached under RUN_DIR/eval/features. A table is printed (or one JSON object with
--json) and saved as RUN_DIR/eval/<task>.json (the export's model card lists it), with a plot
of each score against resolution (RUN_DIR/eval/<task>_resolution.png) when there are several.

Segmentation masks: pixel value = class id, 255 = ignore. ADE20K's annotations use 0 for
"other" (not one of its 150 classes) and 1..150 for the classes: pass --reduce-zero-label (and
--classes 150) to map 0 to ignore and shift the rest down by one, as the benchmark does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def save_result(result: dict, run_dir: str) -> Path:
    """RUN_DIR/eval/<task>.json (and the resolution plot beside it); returns the JSON's path."""
    from .ladder import save_plot

    out = Path(run_dir) / "eval" / f"{result['task']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    save_plot(result, out.with_name(f"{result['task']}_resolution.png"))
    return out


#: ``radio eval`` flags that are evaluator arguments (passed when given; refused when the
#: evaluator has no such argument)
EVALUATOR_FLAGS = ("k", "epochs", "prompts", "images")
#: the smoke tier: a few images per class and per split
SMOKE = {"max_per_class": 4, "max_images": 32}


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


def _parse_arg(item: str) -> tuple[str, object]:
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--arg {item!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


def _main(argv: Optional[Sequence[str]] = None, prog: str = "radio_core.eval") -> int:
    from ..utils import OneLineParser

    p = OneLineParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run's output_dir (recipe.yaml + export/ or checkpoints/)")
    p.add_argument("task", help="report, sweep, or an evaluator: fidelity, knn, linear, zeroshot, seg, ...")
    p.add_argument("--data", help="labelled data: image-folder tree, webdataset shards, HF dataset folder")
    p.add_argument("--resolutions", type=int, nargs="*", help="student resolutions (px; default: every one it trained at)")
    p.add_argument("--teachers", action="store_true", help="also score every teacher through the same protocol")
    p.add_argument("--baselines", nargs="*", default=[], metavar="NAME",
                   help="also score baselines: pixels (raw pixels), random (the student, random-init)")
    p.add_argument("--head", default=None, help="use this teacher head's predictions instead of the backbone's")
    p.add_argument("--smoke", action="store_true", help="smoke tier: at most 4 images per class and 32 per split")
    p.add_argument("--max-per-class", type=int, help="at most N images per class")
    p.add_argument("--max-images", type=int, help="at most N images per split")
    p.add_argument("--test-fraction", type=float, default=0.3, help="held-out share of data that has no split")
    p.add_argument("--classes", type=int, help="seg: number of mask classes (default: largest id + 1)")
    p.add_argument("--reduce-zero-label", action="store_true",
                   help="seg: label 0 is 'other' (ADE20K): ignore it and shift classes 1..N down to 0..N-1")
    p.add_argument("--k", type=int, help="knn: neighbours (default 20)")
    p.add_argument("--epochs", type=int, help="linear / seg: probe training epochs")
    p.add_argument("--prompts", help="zeroshot: openai_imagenet (default), simple_imagenet or classname")
    p.add_argument("--images", type=int, default=None, help="fidelity/report/sweep: number of held-out images (default 4)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any evaluator argument (radio plugins --verbose --kind evaluator NAME), value as YAML")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--out", help="report/sweep: output folder for pictures (default: RUN_DIR/report)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)

    if args.task in ("report", "sweep"):
        return _report_or_sweep(args)
    from ..registry import get_registry
    from .ladder import format_table, run_task

    task = "seg" if args.task == "segment" else args.task
    registry = get_registry()
    component = registry.get("evaluator", task)  # unknown: PluginError naming the evaluators there are
    ev_args = dict(_parse_arg(a) for a in args.arg)
    for flag in EVALUATOR_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            from .ladder import accepts

            if not accepts(component.factory, flag):
                raise ValueError(f"--{flag} is not an argument of evaluator {task!r} (radio plugins --verbose "
                                 f"--kind evaluator {task})")
            ev_args.setdefault(flag, value)
    options = {"test_fraction": args.test_fraction, "reduce_zero_label": args.reduce_zero_label,
               "mask_classes": args.classes, "max_per_class": args.max_per_class, "max_images": args.max_images}
    if args.smoke:
        options.update({k: options[k] or v for k, v in SMOKE.items()})
    result = run_task(args.run_dir, task, args.data, args.resolutions, args.teachers, args.baselines, args.head,
                      ev_args, options, cache=not args.no_cache, registry=registry)
    result["tier"] = "smoke" if args.smoke else "full"
    path = save_result(result, args.run_dir)
    print(json.dumps(result) if args.json else format_table(result) + f"\n(saved to {path})")
    return 0


def _report_or_sweep(args: argparse.Namespace) -> int:
    from .loading import load_run
    from .pictures import save_sweep_plot
    from .report import eval_images, fidelity_table, write_report
    from .tasks import fidelity

    run = load_run(args.run_dir, with_teachers=True)
    out_dir = Path(args.out or Path(args.run_dir) / "report")
    images = args.images or 4
    if args.task == "report":
        print(f"report written to {write_report(run, out_dir, args.resolutions, images)}")
        return 0
    resolutions = args.resolutions or [224, 320, 448, 640, 768, 1024]
    results = fidelity(run.distiller, run.teachers, eval_images(run, images), resolutions)
    print(fidelity_table(results))
    out_dir.mkdir(parents=True, exist_ok=True)
    heads = next(iter(results.values()))
    path = save_sweep_plot(list(results), {h: [results[r][h]["cosine"] for r in results] for h in heads},
                           out_dir / "resolution_sweep.png")
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
