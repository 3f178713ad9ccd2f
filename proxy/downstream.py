"""Downstream evaluation on the proxy world, one protocol for a frozen student and for each
teacher: probes are fit on the ``val`` split, scored on ``test`` (>= 1,000 images).

* ``zeroshot``: top-1 through a CLIP summary (the student's CLIP head, or the CLIP teacher's
  own embedding) against the CLIP teacher's text tower, prompts ``"a photo of a {class}."``;
* ``knn``: DINO's weighted kNN (k=20) on the summary (student: its backbone summary tokens;
  teachers: their summary, or mean-pooled patches for SAM which has none);
* ``linear``: a linear classifier on the same summary;
* ``miou``: linear-probe segmentation of the shape categories (1x1 conv on the spatial
  features, logits upsampled to a 64 px mask);
* ``boundary_f``: the fine part boundaries at full resolution (128 px) read out linearly
  (pixel shuffle) from the spatial features, boundary F-score with 1 px tolerance.

Students are scored at several input resolutions (mode switching shows up here); teachers at
their own input size. ``python -m radio_proxy.downstream RUN_DIR [--teachers]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from radio_core.eval import metrics
from radio_core.eval.tasks import boundary_probe, linear_probe_classification, segmentation_probe, zero_shot_weights

from .world import CLASSES, SEGMENT_CLASSES, ZERO_SHOT_TEMPLATES, ProxyWorld

#: which metric is each teacher family's speciality (the agglomeration target).
SPECIALITY = {"clip": "zeroshot", "dinov2": "miou", "sam": "boundary_f"}
METRICS = ("zeroshot", "knn", "linear", "miou", "boundary_f")
SEG_SIZE = 64

#: images (uint8, N x 3 x H x W) -> (summary (N, D) or None, clip embedding or None, spatial (N, C, h, w))
Encoder = Callable[[Tensor], tuple[Optional[Tensor], Optional[Tensor], Tensor]]


class Labelled:
    """One split's pixels and labels, in memory."""

    def __init__(self, world: ProxyWorld, split: str, limit: Optional[int] = None) -> None:
        n = limit or len(world.labels(split))
        self.images = torch.from_numpy(np.array(world.images(split)[:n])).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(np.array(world.labels(split)[:n]))
        sem = torch.from_numpy(np.array(world.semantic(split)[:n])).long()
        step = max(sem.shape[-1] // SEG_SIZE, 1)
        self.semantic = sem[:, step // 2::step, step // 2::step]
        self.boundary = torch.from_numpy(np.array(world.boundary(split)[:n]))


@torch.no_grad()
def encode(encoder: Encoder, images: Tensor, batch_size: int = 100):
    parts = [encoder(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return tuple(None if p[0] is None else torch.cat(list(p)) for p in zip(*parts))


def score(encoder: Encoder, train: Labelled, test: Labelled, text_weights: Optional[Tensor],
          metrics_wanted: Sequence[str] = METRICS, timing: Optional[dict] = None) -> dict[str, float]:
    """Every downstream metric of one frozen feature extractor; ``timing`` (a dict) receives
    ``images_per_s``, the encoder's throughput on the test images (one forward pass each)."""
    s_tr, c_tr, f_tr = encode(encoder, train.images)
    start = time.perf_counter()
    s_te, c_te, f_te = encode(encoder, test.images)
    if timing is not None:
        timing["images_per_s"] = len(test.images) / (time.perf_counter() - start)
    out: dict[str, float] = {}
    if "zeroshot" in metrics_wanted and c_te is not None and text_weights is not None:
        out["zeroshot"] = metrics.topk_accuracy(F.normalize(c_te, dim=-1) @ text_weights.T, test.labels)["top1"]
    if s_tr is None:  # no summary: mean-pooled patch features stand in
        s_tr, s_te = f_tr.mean((2, 3)), f_te.mean((2, 3))
    n_cls = len(CLASSES)
    if "knn" in metrics_wanted:
        scores = metrics.knn_predict(s_tr, train.labels, s_te, n_cls, k=20)
        out["knn"] = metrics.topk_accuracy(scores, test.labels)["top1"]
    if "linear" in metrics_wanted:
        out["linear"] = linear_probe_classification(s_tr, train.labels, s_te, test.labels, n_cls)["top1"]
    if "miou" in metrics_wanted:
        out["miou"] = segmentation_probe(f_tr, train.semantic, f_te, test.semantic, len(SEGMENT_CLASSES),
                                         epochs=8, batch_size=32)["miou"]
    if "boundary_f" in metrics_wanted:
        out["boundary_f"] = boundary_probe(f_tr, train.boundary, f_te, test.boundary, epochs=6)["boundary_f"]
    return out


# --------------------------------------------------------------------------- encoders


def student_encoder(distiller, clip_head: Optional[str], resolution: int) -> Encoder:
    from radio_core.models import preprocess
    from radio_core.eval.features import student_forward

    def run(u8: Tensor):
        out, preds = student_forward(distiller, preprocess.to_float(u8), (resolution, resolution))
        clip = preds[clip_head][0] if clip_head else None
        return out.summary.flatten(1), clip, out.spatial()

    return run


def teacher_encoder(teacher, is_clip: bool) -> Encoder:
    from radio_core.models import preprocess
    from radio_core.eval.features import teacher_forward

    def run(u8: Tensor):
        target = teacher_forward({"t": teacher}, preprocess.to_float(u8))["t"]
        return target.summary, target.summary if is_clip else None, target.spatial

    return run


def clip_teacher_name(teachers: dict) -> Optional[str]:
    return next((n for n, t in teachers.items() if hasattr(t, "encode_text")), None)


def family(teacher) -> str:
    name = type(teacher).__name__.lower()
    return next((k for k in SPECIALITY if k in name), name)


# --------------------------------------------------------------------------- runs


def world_of_run(recipe) -> ProxyWorld:
    from .world import world_from_args

    spec = recipe.data.source
    if spec.name != "proxy_world":
        raise ValueError(f"downstream: the run trained on {spec.name!r}, not on the proxy world (data.source)")
    return world_from_args(spec.args.get("world"))


def windowed_blocks(student) -> int:
    """How many blocks of a student attend in ViTDet windows when a window size is set (0: the
    student has no window mode, or every block is global)."""
    if not hasattr(student, "set_window_size") or not hasattr(student, "is_global_block"):
        return 0
    return sum(not student.is_global_block(i) for i in range(len(student.blocks)))


def _timed_score(encoder: Encoder, train: Labelled, test: Labelled, weights, metrics_wanted) -> tuple[dict, float]:
    """Scores, and the encoder's throughput (test images per second, one forward pass each)."""
    timing: dict = {}
    return score(encoder, train, test, weights, metrics_wanted, timing), timing["images_per_s"]


def evaluate_run(run_dir: str | Path, resolutions: Sequence[int] = (64, 128), teachers: bool = False,
                 limit: Optional[int] = None, metrics_wanted: Sequence[str] = METRICS,
                 probe_images: Optional[int] = None, windows: Sequence[tuple[int, int]] = ()) -> dict:
    """Downstream scores of a finished run's student at each resolution (and, with
    ``teachers``, of each of its teachers), as ``{"student@64": {...}, "teacher/clip": {...}}``.

    ``windows``: ``(resolution, window)`` pairs scored with the student in ViTDet mode
    (``set_window_size(window)``, key ``student@128w8``); skipped for a student whose blocks are
    all global. ``_meta["images_per_s"]`` holds each student key's single-process throughput."""
    from radio_core.eval.loading import load_run

    start = time.perf_counter()
    run = load_run(run_dir, with_teachers=True)
    world = world_of_run(run.recipe)
    train, test = Labelled(world, "val", probe_images or limit), Labelled(world, "test", limit)
    clip_name = clip_teacher_name(run.teachers)
    weights = zero_shot_weights(run.teachers[clip_name], CLASSES, ZERO_SHOT_TEMPLATES) if clip_name else None
    head = clip_name if clip_name in run.distiller.summary_heads else None  # a student without a CLIP head
    results: dict = {}
    rates: dict[str, float] = {}
    for res in resolutions:
        results[f"student@{res}"], rates[f"student@{res}"] = _timed_score(
            student_encoder(run.distiller, head, res), train, test, weights, metrics_wanted)
    student = run.distiller.student
    for res, ws in windows if windowed_blocks(student) else ():
        previous = student.window_size
        student.set_window_size(ws)
        try:
            results[f"student@{res}w{ws}"], rates[f"student@{res}w{ws}"] = _timed_score(
                student_encoder(run.distiller, head, res), train, test, weights, metrics_wanted)
        finally:
            student.set_window_size(previous)
    if teachers:
        for name, t in run.teachers.items():
            results[f"teacher/{name}"] = score(teacher_encoder(t, name == clip_name), train, test,
                                               weights if name == clip_name else None, metrics_wanted)
    results["_meta"] = {"eval_seconds": time.perf_counter() - start, "test_images": len(test.labels),
                        "probe_images": len(train.labels), "chance_top1": 1 / len(CLASSES), "images_per_s": rates}
    return results


def table(results: dict) -> str:
    rows = [k for k in results if not k.startswith("_")]
    lines = ["| features | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for r in rows:
        cells = [f"{results[r][m]:.3f}" if m in results[r] else "-" for m in METRICS]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="radio_proxy.downstream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run on the proxy world (its output_dir)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], help="student input sizes (px)")
    p.add_argument("--teachers", action="store_true", help="also score every teacher with the same protocol")
    p.add_argument("--limit", type=int, help="use only the first N images of val and test (smoke runs)")
    p.add_argument("--probe-images", type=int, help="fit the probes on the first N val images (default: all)")
    p.add_argument("--window", type=int, nargs=2, action="append", default=[], metavar=("RES", "WINDOW"),
                   help="also score the student in ViTDet mode: windows of WINDOW tokens at RES px (repeatable)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    results = evaluate_run(args.run_dir, args.resolutions, args.teachers, args.limit,
                           probe_images=args.probe_images, windows=[tuple(w) for w in args.window])
    print(table(results))
    meta = results["_meta"]
    print(f"{meta['test_images']} test images, probes fit on {meta['probe_images']}; zero-shot chance "
          f"{meta['chance_top1']:.3f}; {meta['eval_seconds']:.0f} s")
    print("student images/s (one process): " + ", ".join(f"{k} {v:.0f}" for k, v in meta["images_per_s"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
