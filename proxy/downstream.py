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
* ``parts_miou``: the parts' fine textures at 128 px from a linear pixel-shuffle read-out (each
  feature vector predicts the pixels of its cell; only where 128 px is a whole number of cells:
  64 and 128 px inputs for patch 8): the mean IoU of the three textures (horizontal, vertical,
  checks), background being predicted but not averaged in (an object mask alone scores ~0).

It is the evaluator ``proxy`` (plugin kind ``evaluator``; it brings its own data): every subject
of the evaluation ladder goes through it the same way::

    radio eval RUN_DIR proxy --teachers --baselines pixels random

and a sweep file's ``eval: {proxy: {resolutions: [64, 128]}}`` scores each run's student. Besides
each score, ``se_<metric>`` is its test-set standard error (bootstrap over the test images):
the part of the noise that the test set's size leaves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

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
class Encoded:
    summary: Tensor
    clip: Optional[Tensor]
    spatial: Tensor


@torch.no_grad()
def encode(subject: Any, images: Tensor, batch_size: int = 100, progress: Any = None) -> Encoded:
    """A subject's features of uint8 images (N, 3, H, W) (``radio_core.protocols.Subject``: it
    resizes them to its own input)."""
    parts = []
    for i in range(0, len(images), batch_size):
        f = subject.features(images[i:i + batch_size].float() / 255)
        parts.append((f.summary, f.embedding, f.spatial))
        if progress is not None:
            progress.update(len(images[i:i + batch_size]))
    summary, clip, spatial = (None if p[0] is None else torch.cat(list(p)).float() for p in zip(*parts))
    if summary is None:  # no summary: mean-pooled patch features stand in
        summary = spatial.mean((2, 3))
    return Encoded(summary, clip, spatial)


def _rate(correct: Tensor) -> tuple[float, float]:
    """Mean and its bootstrap standard error over the test items."""
    return float(correct.float().mean()), probes.bootstrap_se(correct)


def score(train: Encoded, test: Encoded, fit: Labelled, held: Labelled, text_weights: Optional[Tensor],
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
        seg = probes.shuffle_segmentation_probe(train.spatial, fit.parts, test.spatial, held.parts, len(PART_CLASSES),
                                                scored=list(range(1, len(PART_CLASSES))))
        out["parts_miou"], noise["parts_miou"] = seg["miou"], seg["bootstrap_se"]
    return out, noise


# --------------------------------------------------------------------------- the evaluator


def world_of_run(recipe) -> ProxyWorld:
    from .world import world_from_args

    spec = recipe.data.source
    if spec.name != "proxy_world":
        raise ValueError(f"proxy: the run trained on {spec.name!r}, not on the proxy world (data.source)")
    return world_from_args(spec.args.get("world"))


class ProxyEvaluator:
    """Every proxy metric of one subject (see the module docstring); the world is the one the
    run trained on (or ``world``), val fits the probes, test scores."""

    name, needs = "proxy", ()
    scores = METRICS
    chance = CHANCE

    def __init__(self, world: Optional[dict] = None, limit: Optional[int] = None,
                 metrics: Sequence[str] = METRICS, corruptions: Sequence[str] = ()) -> None:
        from radio_core.eval.corruptions import CORRUPTIONS

        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"proxy: unknown metrics {unknown}; known: {', '.join(METRICS)}")
        self.corruptions = []
        for item in corruptions:
            name, _, severity = str(item).partition(":")
            if name not in CORRUPTIONS or not severity.isdigit() or not 1 <= int(severity) <= 5:
                raise ValueError(f"proxy: corruption {item!r} is not NAME:SEVERITY with NAME one of "
                                 f"{', '.join(CORRUPTIONS)} and SEVERITY 1-5")
            self.corruptions.append((name, int(severity)))
        self.world_args, self.limit, self.metrics = world, limit, tuple(metrics)
        # the metrics asked for (zero-shot brings its colour and shape parts), then their corrupted versions
        wanted = [m for m in METRICS if ("zeroshot" if m.startswith("zeroshot") else m) in self.metrics]
        self.scores = tuple(wanted) + tuple(f"{m}_{n}{sev}" for n, sev in self.corruptions for m in wanted)
        self._splits: dict[str, tuple[Labelled, Labelled]] = {}
        self._text: dict[int, Tensor] = {}

    def splits(self, subject: Any) -> tuple[Labelled, Labelled]:
        from .world import world_from_args

        run = getattr(subject, "run", None)
        world = world_from_args(self.world_args) if self.world_args is not None or run is None \
            else world_of_run(run.recipe)
        if world.fingerprint not in self._splits:
            self._splits[world.fingerprint] = (Labelled(world, "val", self.limit), Labelled(world, "test", self.limit))
        return self._splits[world.fingerprint]

    def corrupted(self, held: Labelled, name: str, severity: int) -> Labelled:
        """The test split with ImageNet-C's corruption ``name`` at ``severity`` (seeded), labels kept."""
        from copy import copy

        from radio_core.eval.corruptions import corrupt

        out = copy(held)
        images = corrupt(held.images.float() / 255, name, severity, seed=0)
        out.images = (images * 255).round().clamp(0, 255).to(torch.uint8)
        return out

    def text_weights(self, subject: Any) -> Optional[Tensor]:
        """The zero-shot classifier from the subject's text tower (prompt ensemble of
        ``ZERO_SHOT_TEMPLATES``), or None for a subject without one."""
        emb = subject.encode_text([t.format(c) for c in CLASSES for t in ZERO_SHOT_TEMPLATES])
        if emb is None:
            return None
        emb = F.normalize(emb.float(), dim=-1).view(len(CLASSES), len(ZERO_SHOT_TEMPLATES), -1).mean(1)
        return F.normalize(emb, dim=-1)

    def __call__(self, subject: Any, data: Any = None) -> dict[str, Any]:
        from radio_core.progress import progress

        fit, held = self.splits(subject)
        bar = progress(len(fit) + len(held), f"proxy {subject.name}", "img", every_s=30)
        try:
            train, test = encode(subject, fit.images, progress=bar), encode(subject, held.images, progress=bar)
        finally:
            bar.close()
        text = self.text_weights(subject)
        scores, noise = score(train, test, fit, held, text, self.metrics)
        for name, severity in self.corruptions:  # probes fit on clean val, scored on corrupted test images
            corrupted = self.corrupted(held, name, severity)
            extra, _ = score(train, encode(subject, corrupted.images), fit, corrupted, text, self.metrics)
            scores.update({f"{k}_{name}{severity}": v for k, v in extra.items()})
        return {"task": "proxy", "probe_images": len(fit), "test_images": len(held),
                "probe": "ridge, penalty by 5-fold cross-validation on val (closed form: no probe seed)",
                "prompts": ZERO_SHOT_TEMPLATES[0], **scores, **{f"se_{k}": v for k, v in noise.items()}}


def build_proxy_evaluator(world: Optional[dict] = None, limit: Optional[int] = None,
                          metrics: Optional[list[str]] = None, corruptions: Optional[list[str]] = None) -> ProxyEvaluator:
    """The proxy world's downstream scores (zero-shot split into colour and shape, kNN, linear
    probe, mIoU, parts mIoU). world: the proxy world's options (default: the run's). limit: only
    the first N val and test images (smoke runs). metrics: a subset of the metrics. corruptions:
    also score on corrupted test images, NAME:SEVERITY each (ImageNet-C's gaussian_noise,
    gaussian_blur, jpeg; severity 1-5), keys <metric>_<name><severity>."""
    return ProxyEvaluator(world, limit, metrics or METRICS, corruptions or ())


__all__ = ["ProxyEvaluator", "build_proxy_evaluator", "METRICS", "SPECIALITY", "CHANCE", "Labelled", "score"]
