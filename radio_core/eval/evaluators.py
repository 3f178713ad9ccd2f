"""The built-in evaluators (plugin kind ``evaluator``; see ``radio_core.protocols``): kNN, linear
probe, zero-shot, segmentation probe and fidelity. Each is built from its arguments and called on
one subject and the labelled data; features come from ``subjects.extract`` (cached)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..protocols import EvalData, Evaluator, Subject
from . import metrics
from .subjects import extract

#: zero-shot prompt sets: open_clip's copies of the templates CLIP benchmarks use
#: (``open_clip.zero_shot_metadata``), or the bare class name.
PROMPT_SETS = {
    "openai_imagenet": "OPENAI_IMAGENET_TEMPLATES (80 templates, CLIP's ImageNet prompt ensemble)",
    "simple_imagenet": "SIMPLE_IMAGENET_TEMPLATES (the 7-template subset)",
    "classname": "the class name alone",
}


def prompt_templates(name: str) -> list:
    """The templates of a prompt set (callables: class name -> prompt)."""
    if name == "classname":
        return [lambda c: c]
    if name not in PROMPT_SETS:
        raise ValueError(f"prompts: unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}")
    from open_clip import zero_shot_metadata

    return list(getattr(zero_shot_metadata, name.upper() + "_TEMPLATES"))


class _Base(Evaluator):
    def __init__(self, batch_size: int = 32, cache_dir: Optional[str] = None) -> None:
        self.batch_size, self.cache_dir = batch_size, Path(cache_dir) if cache_dir else None

    def features(self, subject: Subject, data: EvalData, split: str, how: str = "crop"):
        return extract(subject, data, split, how, self.batch_size, self.cache_dir)

    @staticmethod
    def summary(f) -> torch.Tensor:
        """The subject's image-level features (mean-pooled spatial ones when it has none)."""
        return f.summary if f.summary is not None else f.spatial.mean((2, 3))

    @staticmethod
    def sizes(data: EvalData) -> dict[str, Any]:
        return {"train_images": len(data.train), "test_images": len(data.test), "data": data.source}


class KnnEvaluator(_Base):
    """DINO's weighted kNN on the subject's summary features: top-1 / top-5."""

    name, needs, scores = "knn", ("images", "labels"), ("top1", "top5")

    def __init__(self, k: int = 20, temperature: float = 0.07, backend: str = "auto", **kw: Any) -> None:
        super().__init__(**kw)
        if backend not in ("auto", "torch", "faiss"):
            raise ValueError(f"backend must be auto, torch or faiss, got {backend!r}")
        self.k, self.temperature, self.backend = k, temperature, backend

    def __call__(self, subject: Subject, data: EvalData) -> dict[str, Any]:
        tr, te = self.summary(self.features(subject, data, "train")), self.summary(self.features(subject, data, "test"))
        scores = metrics.knn_predict(tr, data.train.labels, te, len(data.classes), self.k, self.temperature,
                                     self.backend)
        search = self.backend if self.backend != "auto" else ("faiss" if len(tr) >= metrics.FAISS_FROM else "torch")
        return {"task": "knn", "k": self.k, "temperature": self.temperature, "search": search,
                "classes": len(data.classes), **self.sizes(data), **metrics.topk_accuracy(scores, data.test.labels)}


class LinearEvaluator(_Base):
    """A linear classifier on the frozen, standardised summary features (full-batch AdamW on
    cross-entropy): top-1 / top-5 on the test split."""

    name, needs, scores = "linear", ("images", "labels"), ("top1", "top5")

    def __init__(self, epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.epochs, self.lr, self.weight_decay, self.seed = epochs, lr, weight_decay, seed

    def __call__(self, subject: Subject, data: EvalData) -> dict[str, Any]:
        from .tasks import linear_probe_classification

        tr, te = self.summary(self.features(subject, data, "train")), self.summary(self.features(subject, data, "test"))
        acc = linear_probe_classification(tr, data.train.labels, te, data.test.labels, len(data.classes),
                                          self.epochs, self.lr, self.weight_decay, self.seed)
        return {"task": "linear", "epochs": self.epochs, "classes": len(data.classes), **self.sizes(data), **acc}


class ZeroShotEvaluator(_Base):
    """Zero-shot classification: the subject's image embedding against its text tower's
    embeddings of the class names in every prompt template (per class, the normalised mean of
    the normalised prompt embeddings). Only the test split is used."""

    name, needs, scores = "zeroshot", ("images", "labels", "text"), ("top1", "top5")

    def __init__(self, prompts: str = "openai_imagenet", **kw: Any) -> None:
        super().__init__(**kw)
        self.templates, self.prompts = prompt_templates(prompts), prompts

    def __call__(self, subject: Subject, data: EvalData) -> dict[str, Any]:
        if subject.encode_text(["a photo."]) is None:
            return {"task": "zeroshot", "skipped": f"{subject.name} has no text tower"}
        f = self.features(subject, data, "test")
        if f.embedding is None:
            return {"task": "zeroshot", "skipped": f"{subject.name} has no embedding in a text tower's space"}
        from .tasks import zero_shot_weights

        weights = zero_shot_weights(subject, data.classes, self.templates)
        scores = F.normalize(f.embedding.float(), dim=-1) @ weights.T
        example = self.templates[0](data.classes[0])
        return {"task": "zeroshot", "prompts": f"{self.prompts}: {PROMPT_SETS[self.prompts]} with the class names, "
                f"e.g. {example!r}", "classes": len(data.classes), "test_images": len(data.test),
                "data": data.source, **metrics.topk_accuracy(scores, data.test.labels)}


class SegmentationEvaluator(_Base):
    """A linear (1x1 conv) probe on the frozen spatial features, logits bilinearly upsampled to
    the masks (resized to ``mask_size``, nearest); mIoU, pixel accuracy and the boundary F-score
    of the predicted segments (1 px tolerance) on the test split. Images are resized whole (no
    crop), so masks stay aligned."""

    name, needs, scores = "seg", ("images", "masks"), ("miou", "pixel_acc", "boundary_f")

    def __init__(self, epochs: int = 20, lr: float = 1e-2, mask_size: int = 224, seed: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.epochs, self.lr, self.mask_size, self.seed = epochs, lr, mask_size, seed

    def masks(self, split) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        size = (self.mask_size, self.mask_size)
        return torch.stack([torch.from_numpy(np.asarray(Image.fromarray(m.astype(np.int32)).resize(size, Image.NEAREST),
                                                        dtype=np.int64).copy()) for m in split.masks])

    def __call__(self, subject: Subject, data: EvalData) -> dict[str, Any]:
        from .tasks import segmentation_probe

        ftr = self.features(subject, data, "train", "resize").spatial
        fte = self.features(subject, data, "test", "resize").spatial
        if ftr is None:
            return {"task": "seg", "skipped": f"{subject.name} has no spatial features"}
        result = segmentation_probe(ftr, self.masks(data.train), fte, self.masks(data.test), data.mask_classes,
                                    epochs=self.epochs, lr=self.lr, ignore_index=data.ignore_index, seed=self.seed)
        result.pop("per_class_iou")
        return {"task": "seg", "classes": data.mask_classes, "epochs": self.epochs, "mask_size": self.mask_size,
                **self.sizes(data), **result}


class FidelityEvaluator(Evaluator):
    """Cosine similarity and relative MSE of each adaptor head of a student subject against its
    teacher, on the data's test images or (without data) ``images`` of the recipe's
    ``eval.source``; teachers run at their own resolution."""

    name, needs, needs_teachers = "fidelity", (), True

    def __init__(self, images: int = 4) -> None:
        self.images = images

    def __call__(self, subject: Subject, data: Optional[EvalData]) -> dict[str, Any]:
        from .report import eval_images
        from .tasks import fidelity

        distiller, run = getattr(subject, "distiller", None), getattr(subject, "run", None)
        if distiller is None or not getattr(subject, "teachers", None):
            return {"task": "fidelity", "skipped": f"{subject.name} has no adaptor heads to compare with teachers"}
        images = list(data.test.images)[: self.images] if data is not None else eval_images(run, self.images)
        results = fidelity(distiller, subject.teachers, images, [subject.resolution[0]])
        row = next(iter(results.values()))
        return {"task": "fidelity", "images": len(images),
                **{f"{head}/{m}": v for head, ms in row.items() for m, v in ms.items()}}


def build_knn(k: int = 20, temperature: float = 0.07, backend: str = "auto", batch_size: int = 32,
              cache_dir: Optional[str] = None) -> KnnEvaluator:
    """kNN classification (DINO's weighted vote) on summary features: top-1 / top-5.

    k: neighbours.
    temperature: vote weight exp(sim / T).
    backend: auto | torch | faiss (auto: faiss from 20,000 training images).
    batch_size: images per forward.
    cache_dir: feature cache (default: RUN/eval/features).
    """
    return KnnEvaluator(k, temperature, backend, batch_size=batch_size, cache_dir=cache_dir)


def build_linear(epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0,
                 batch_size: int = 32, cache_dir: Optional[str] = None) -> LinearEvaluator:
    """Linear-probe classification on summary features: top-1 / top-5.

    epochs: full-batch AdamW steps.
    lr: learning rate.
    weight_decay: AdamW decay.
    seed: probe init.
    batch_size: images per forward.
    cache_dir: feature cache (default: RUN/eval/features).
    """
    return LinearEvaluator(epochs, lr, weight_decay, seed, batch_size=batch_size, cache_dir=cache_dir)


def build_zeroshot(prompts: str = "openai_imagenet", batch_size: int = 32,
                   cache_dir: Optional[str] = None) -> ZeroShotEvaluator:
    """Zero-shot classification through a text tower and prompt templates: top-1 / top-5.

    prompts: openai_imagenet | simple_imagenet | classname (open_clip.zero_shot_metadata's sets).
    batch_size: images per forward.
    cache_dir: feature cache (default: RUN/eval/features).
    """
    return ZeroShotEvaluator(prompts, batch_size=batch_size, cache_dir=cache_dir)


def build_seg(epochs: int = 20, lr: float = 1e-2, mask_size: int = 224, seed: int = 0, batch_size: int = 32,
              cache_dir: Optional[str] = None) -> SegmentationEvaluator:
    """Linear-probe segmentation: mIoU, pixel accuracy, boundary F.

    epochs: passes over the training masks.
    lr: AdamW learning rate.
    mask_size: side the masks are scored at.
    seed: probe init.
    batch_size: images per forward.
    cache_dir: feature cache (default: RUN/eval/features).
    """
    return SegmentationEvaluator(epochs, lr, mask_size, seed, batch_size=batch_size, cache_dir=cache_dir)


def build_fidelity(images: int = 4) -> FidelityEvaluator:
    """Adaptor heads against their teachers: cosine similarity, relative MSE.

    images: held-out images (the data's test split, else the recipe's eval.source).
    """
    return FidelityEvaluator(images)


BUILTIN = {"knn": build_knn, "linear": build_linear, "zeroshot": build_zeroshot, "seg": build_seg,
           "fidelity": build_fidelity}

__all__ = ["KnnEvaluator", "LinearEvaluator", "ZeroShotEvaluator", "SegmentationEvaluator", "FidelityEvaluator",
           "BUILTIN", "PROMPT_SETS", "prompt_templates"]
