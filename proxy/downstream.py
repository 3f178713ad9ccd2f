"""Downstream evaluation on the proxy world: one protocol for a frozen student, each teacher and
two baselines (raw pixels, the student's architecture at random initialisation). Probes are fit
on the whole ``val`` split and scored on ``test``; every probe is a closed-form ridge read-out
with its penalty chosen by 5-fold cross-validation on val (``radio_proxy.probes``), so a score
has no probe seed.

Metrics, each at an input resolution (``name@res``):

* ``zeroshot`` top-1 (20 classes, chance 0.05) through a CLIP embedding (the student's CLIP head,
  or the CLIP teacher's own) against the CLIP teacher's text tower, prompts ``"a photo of a
  {class}."``; split into ``zeroshot_colour`` and ``zeroshot_shape`` (the predicted class's
  colour / shape right; chance 0.25 / 0.2);
* ``knn`` (DINO's weighted kNN, k = 20) and ``linear`` (ridge probe) on the summary vector
  (student: its backbone summary tokens; a teacher: its summary, or mean-pooled patches; raw
  pixels: the image pooled to 8 x 8);
* ``miou``: a linear segmentation read-out of the patch features, upsampled to 64 px masks of
  sky / ground / five shapes;
* ``parts_miou``: the parts' fine textures (background, horizontal, vertical, checks) at 128 px
  from a linear pixel-shuffle read-out (each feature vector predicts the pixels of its cell; only
  where 128 px is a whole number of cells: 64 and 128 px inputs for patch 8).

``python -m radio_proxy.downstream RUN_DIR [--teachers] [--baselines]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import probes
from .world import CLASSES, COLOUR_NAMES, PART_CLASSES, SEGMENT_CLASSES, SHAPES, ZERO_SHOT_TEMPLATES, ProxyWorld

#: which metric is each teacher family's speciality, at the teacher's own input size.
SPECIALITY = {"clip": "zeroshot@64", "dinov2": "miou@64", "sam": "parts_miou@128"}
METRICS = ("zeroshot", "zeroshot_colour", "zeroshot_shape", "knn", "linear", "miou", "parts_miou")
CHANCE = {"zeroshot": 1 / len(CLASSES), "zeroshot_colour": 1 / len(COLOUR_NAMES), "zeroshot_shape": 1 / len(SHAPES)}
SEG_SIZE = 64
RAW_PATCH = 8

#: uint8 images (N, 3, H, W) -> (summary (N, D) or None, CLIP embedding (N, E) or None, spatial (N, C, h, w))
Encoder = Callable[[Tensor], tuple[Optional[Tensor], Optional[Tensor], Tensor]]


class Labelled:
    """One split's pixels and labels, in memory."""

    def __init__(self, world: ProxyWorld, split: str, limit: Optional[int] = None) -> None:
        n = min(limit or world.cfg.split_size(split), world.cfg.split_size(split))
        self.images = torch.from_numpy(np.array(world.images(split)[:n])).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(np.array(world.labels(split)[:n]))
        sem = torch.from_numpy(np.array(world.semantic(split)[:n])).long()
        step = max(sem.shape[-1] // SEG_SIZE, 1)
        self.semantic = sem[:, step // 2::step, step // 2::step]
        self.parts = torch.from_numpy(np.array(world.parts(split)[:n])).long()

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Features:
    summary: Tensor
    clip: Optional[Tensor]
    spatial: Tensor


@torch.no_grad()
def encode(encoder: Encoder, images: Tensor, batch_size: int = 100) -> Features:
    parts = [encoder(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    summary, clip, spatial = (None if p[0] is None else torch.cat(list(p)).float() for p in zip(*parts))
    if summary is None:  # no summary: mean-pooled patch features stand in
        summary = spatial.mean((2, 3))
    return Features(summary, clip, spatial)


def _rate(correct: Tensor) -> tuple[float, float]:
    """Mean and its bootstrap standard error over the test items."""
    return float(correct.float().mean()), probes.bootstrap_se(correct)


def score(train: Features, test: Features, fit: Labelled, held: Labelled, text_weights: Optional[Tensor],
          metrics: Sequence[str] = METRICS) -> tuple[dict, dict]:
    """(scores, test-set standard errors) of one subject's features at one resolution."""
    out, noise = {}, {}
    if text_weights is not None and test.clip is not None and "zeroshot" in metrics:
        pred = (F.normalize(test.clip, dim=-1) @ text_weights.T).argmax(1)
        for name, same in (("zeroshot", pred == held.labels),
                           ("zeroshot_colour", pred // len(SHAPES) == held.labels // len(SHAPES)),
                           ("zeroshot_shape", pred % len(SHAPES) == held.labels % len(SHAPES))):
            out[name], noise[name] = _rate(same)
    if "knn" in metrics:
        pred = probes.knn_accuracy(train.summary, fit.labels, test.summary, len(CLASSES))
        out["knn"], noise["knn"] = _rate(pred == held.labels)
    if "linear" in metrics:
        scores_, _ = probes.class_probe(train.summary, fit.labels, test.summary, len(CLASSES))
        out["linear"], noise["linear"] = _rate(scores_.argmax(1) == held.labels)
    if "miou" in metrics:
        seg = probes.segmentation_probe(train.spatial, fit.semantic, test.spatial, held.semantic, len(SEGMENT_CLASSES))
        out["miou"], noise["miou"] = seg["miou"], seg["bootstrap_se"]
    if "parts_miou" in metrics and held.parts.shape[-1] % test.spatial.shape[-1] == 0:
        seg = probes.shuffle_segmentation_probe(train.spatial, fit.parts, test.spatial, held.parts, len(PART_CLASSES))
        out["parts_miou"], noise["parts_miou"] = seg["miou"], seg["bootstrap_se"]
    return out, noise


# --------------------------------------------------------------------------- subjects


def student_encoder(distiller, clip_head: Optional[str], resolution: int) -> Encoder:
    from radio_core.eval.features import student_forward
    from radio_core.models import preprocess

    def run(u8: Tensor):
        out, preds = student_forward(distiller, preprocess.to_float(u8), (resolution, resolution))
        clip = preds[clip_head][0] if clip_head else None
        return out.summary.flatten(1), clip, out.spatial()

    return run


def teacher_encoder(teacher, is_clip: bool) -> Encoder:
    from radio_core.eval.features import teacher_forward
    from radio_core.models import preprocess

    def run(u8: Tensor):
        target = teacher_forward({"t": teacher}, preprocess.to_float(u8))["t"]
        return target.summary, target.summary if is_clip else None, target.spatial

    return run


def raw_encoder(resolution: int) -> Encoder:
    """The floor every learned feature must beat: the image itself. Summary: the image pooled
    to 8 x 8 (192 numbers); spatial: each 8 x 8 pixel patch flattened (192 numbers a cell)."""
    def run(u8: Tensor):
        x = F.interpolate(u8.float() / 255, size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
        return F.adaptive_avg_pool2d(x, 8).flatten(1), None, F.pixel_unshuffle(x, RAW_PATCH)

    return run


def family(teacher) -> str:
    name = type(teacher).__name__.lower()
    return next((k for k in SPECIALITY if k in name), name)


def teacher_resolution(teacher) -> int:
    return int(teacher.input_size[0])


def clip_teacher_name(teachers: dict) -> Optional[str]:
    return next((n for n, t in teachers.items() if hasattr(t, "encode_text")), None)


# --------------------------------------------------------------------------- evaluation


@dataclass
class Bench:
    """The labelled splits and the zero-shot classifier, loaded once for many subjects."""

    fit: Labelled
    held: Labelled
    text_weights: Optional[Tensor]

    def run(self, encoder: Encoder, metrics: Sequence[str] = METRICS, resolution: Optional[int] = None,
            log: Callable[[str], None] = lambda _: None, name: str = "") -> tuple[dict, dict]:
        """Scores keyed ``metric@resolution`` and their test-set standard errors."""
        start = time.perf_counter()
        train, test = encode(encoder, self.fit.images), encode(encoder, self.held.images)
        encoded = time.perf_counter()
        scores, noise = score(train, test, self.fit, self.held, self.text_weights, metrics)
        log(f"  {name}@{resolution}: encoded in {encoded - start:.0f} s, probes {time.perf_counter() - encoded:.0f} s: "
            + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        tag = f"@{resolution}"
        return {k + tag: v for k, v in scores.items()}, {k + tag: v for k, v in noise.items()}


def world_of_run(recipe) -> ProxyWorld:
    from .world import world_from_args

    spec = recipe.data.source
    if spec.name != "proxy_world":
        raise ValueError(f"downstream: the run trained on {spec.name!r}, not on the proxy world (data.source)")
    return world_from_args(spec.args.get("world"))


def make_bench(world: ProxyWorld, teachers: dict, limit: Optional[int] = None) -> Bench:
    from radio_core.eval.tasks import zero_shot_weights

    clip_name = clip_teacher_name(teachers)
    weights = zero_shot_weights(teachers[clip_name], CLASSES, ZERO_SHOT_TEMPLATES) if clip_name else None
    return Bench(Labelled(world, "val", limit), Labelled(world, "test", limit), weights)


def windowed_blocks(student) -> int:
    """How many blocks of a student attend in ViTDet windows when a window size is set (0: the
    student has no window mode, or every block is global)."""
    if not hasattr(student, "set_window_size") or not hasattr(student, "is_global_block"):
        return 0
    return sum(not student.is_global_block(i) for i in range(len(student.blocks)))


def evaluate_student(distiller, teachers: dict, bench: Bench, resolutions: Sequence[int],
                     windows: Sequence[tuple[int, int]] = (), log: Callable[[str], None] = lambda _: None,
                     name: str = "student") -> tuple[dict, dict, dict]:
    """(scores, noise, images/s) of a student at each resolution (and in ViTDet mode at each
    ``(resolution, window)`` pair when it has windowed blocks). Keys: ``metric@res`` and
    ``metric@{res}w{window}``."""
    clip_name = clip_teacher_name(teachers)
    head = clip_name if clip_name in distiller.summary_heads else None  # a student without a CLIP head
    scores, noise, rates = {}, {}, {}
    for res in resolutions:
        start = time.perf_counter()
        s, n = bench.run(student_encoder(distiller, head, res), resolution=res, log=log, name=name)
        scores.update(s)
        noise.update(n)
        rates[str(res)] = 2 * len(bench.held) / (time.perf_counter() - start)
    student = distiller.student
    for res, ws in windows if windowed_blocks(student) else ():
        previous = student.window_size
        student.set_window_size(ws)
        try:
            s, n = bench.run(student_encoder(distiller, head, res), resolution=f"{res}w{ws}", log=log, name=name)
        finally:
            student.set_window_size(previous)
        scores.update(s)
        noise.update(n)
    return scores, noise, rates


def evaluate_teachers(teachers: dict, bench: Bench, log: Callable[[str], None] = lambda _: None) -> dict[str, dict]:
    """Each teacher's scores at its own input size: ``{"teacher/clip": {"zeroshot@64": ...}}``."""
    clip_name = clip_teacher_name(teachers)
    out = {}
    for name, t in teachers.items():
        is_clip = name == clip_name
        bench_t = bench if is_clip else Bench(bench.fit, bench.held, None)
        out[f"teacher/{name}"], _ = bench_t.run(teacher_encoder(t, is_clip), resolution=teacher_resolution(t),
                                               log=log, name=f"teacher/{name}")
    return out


def evaluate_raw(bench: Bench, resolutions: Sequence[int], log: Callable[[str], None] = lambda _: None) -> dict:
    scores = {}
    for res in resolutions:
        s, _ = Bench(bench.fit, bench.held, None).run(raw_encoder(res), resolution=res, log=log, name="raw")
        scores.update(s)
    return scores


def random_init_distiller(recipe, teachers: dict, seed: int):
    """The run's student and heads as training starts (``train.seed``), never trained."""
    from radio_core.models.distiller import build_distiller
    from radio_core.registry import get_registry

    dims = {n: (t.summary_dim, t.spatial_dim) for n, t in teachers.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_distiller(recipe, dims, get_registry())


def evaluate_run(run_dir: str | Path, resolutions: Sequence[int] = (64, 128), teachers: bool = False,
                 baselines: bool = False, limit: Optional[int] = None, windows: Sequence[tuple[int, int]] = (),
                 log: Callable[[str], None] = lambda _: None) -> dict:
    """Downstream scores of a finished run's student, as ``{"student": {"miou@64": ...},
    "teacher/clip": {...}, "raw": {...}, "random_init": {...}, "_meta": {...}}`` (teachers and
    baselines on request). ``_meta`` holds the test-set standard errors and the student's
    single-process throughput per resolution."""
    from radio_core.eval.loading import load_run

    start = time.perf_counter()
    run = load_run(run_dir, with_teachers=True)
    bench = make_bench(world_of_run(run.recipe), run.teachers, limit)
    scores, noise, rates = evaluate_student(run.distiller, run.teachers, bench, resolutions, windows, log)
    results: dict = {"student": scores}
    if teachers:
        results.update(evaluate_teachers(run.teachers, bench, log))
    if baselines:
        results["raw"] = evaluate_raw(bench, resolutions, log)
        rand = random_init_distiller(run.recipe, run.teachers, run.recipe.train.seed)
        results["random_init"], _, _ = evaluate_student(rand, run.teachers, bench, resolutions, log=log,
                                                        name="random_init")
    results["_meta"] = {"eval_seconds": time.perf_counter() - start, "test_images": len(bench.held),
                        "probe_images": len(bench.fit), "chance": CHANCE, "test_se": noise, "images_per_s": rates,
                        "probe": "ridge, penalty by 5-fold CV on val (exact solve: no probe seed)"}
    return results


def table(results: dict, resolutions: Sequence[int] = ()) -> str:
    rows = [k for k in results if not k.startswith("_")]
    keys = list(dict.fromkeys(k for r in rows for k in results[r]))
    lines = ["| features | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{results[r][m]:.3f}" if m in results[r] else "-" for m in keys]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="radio_proxy.downstream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run on the proxy world (its output_dir)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], help="student input sizes (px)")
    p.add_argument("--teachers", action="store_true", help="also score every teacher with the same protocol")
    p.add_argument("--baselines", action="store_true",
                   help="also score raw pixels and the student's architecture at random initialisation")
    p.add_argument("--limit", type=int, help="use only the first N images of val and test (smoke runs)")
    p.add_argument("--window", type=int, nargs=2, action="append", default=[], metavar=("RES", "WINDOW"),
                   help="also score the student in ViTDet mode: windows of WINDOW tokens at RES px (repeatable)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    results = evaluate_run(args.run_dir, args.resolutions, args.teachers, args.baselines, args.limit,
                           windows=[tuple(w) for w in args.window], log=lambda m: print(m, flush=True))
    print(table(results))
    meta = results["_meta"]
    print(f"{meta['test_images']} test images, probes fit on {meta['probe_images']} val images ({meta['probe']}); "
          f"zero-shot chance {meta['chance']['zeroshot']:.3f}; {meta['eval_seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
