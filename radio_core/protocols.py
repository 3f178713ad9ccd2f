"""The contracts between the framework and its plugins.

A plugin provides *factories*: callables that build a component from keyword arguments taken
from the recipe. The framework only ever talks to components through the classes below, so
``radio_core`` never needs to know what CLIP, DINOv2 or SAM are.

Tensor layout conventions
-------------------------
* images handed to a teacher: float (B, 3, H, W), already resized to ``teacher.input_size``
  and normalised with ``teacher.mean`` / ``teacher.std`` by the framework.
* images handed to a student: float (B, 3, H, W) in [0, 1]; the student normalises itself
  (its input conditioner lives inside the model, as in RADIO).
* spatial features are grids (B, C, h, w); token sequences are (B, N, C).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from torch import Tensor, nn

ResizeMode = Literal["resize", "longest_side_pad"]


@dataclass
class TeacherOutput:
    """What a teacher produces for one batch.

    summary: (B, D_summary) image-level target (CLIP image embedding, DINOv2 CLS) or None.
    spatial: (B, D_spatial, h, w) dense feature grid.
    """

    summary: Optional[Tensor]
    spatial: Tensor

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.spatial.shape[-2:])  # type: ignore[return-value]


@dataclass
class StudentOutput:
    """What a student produces for one batch.

    summary: (B, S, D) summary tokens (one CLS token per teacher slot, as RADIO does).
    patches: (B, h*w, D) patch tokens in row-major order.
    grid: (h, w) of the patch tokens.
    """

    summary: Tensor
    patches: Tensor
    grid: tuple[int, int]
    #: patch tokens (B, h*w, D) after block k (1-based), for the blocks the framework asked for
    #: through ``Student.intermediate_layers`` (intermediate-layer targets); else empty.
    intermediates: dict[int, Tensor] = field(default_factory=dict)

    def spatial(self) -> Tensor:
        """Patch tokens as a (B, D, h, w) grid."""
        b, n, d = self.patches.shape
        h, w = self.grid
        if n != h * w:
            raise ValueError(f"student returned {n} patch tokens for a {h}x{w} grid")
        return self.patches.transpose(1, 2).reshape(b, d, h, w)


class Teacher(nn.Module):
    """A frozen feature extractor whose features the student learns to reproduce.

    Subclasses set the declared attributes in ``__init__`` and implement ``forward``.
    The framework resizes and normalises inputs (once per group of teachers that share an
    input size), calls the teacher under ``torch.no_grad`` in eval mode, and never trains it.
    """

    #: (H, W) the teacher runs at.
    input_size: tuple[int, int]
    patch_size: int
    #: per-channel normalisation applied by the framework to [0, 1] images.
    mean: Sequence[float]
    std: Sequence[float]
    #: dimension of ``TeacherOutput.summary``, or None when the teacher has no summary target.
    summary_dim: Optional[int]
    spatial_dim: int
    #: how the framework maps the shared crop to ``input_size``: plain resize, or SAM's
    #: resize-longest-side-then-pad (the padded part of the output grid is cropped away).
    resize_mode: ResizeMode = "resize"

    def forward(self, images: Tensor) -> TeacherOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def freeze(self) -> "Teacher":
        """Eval mode and no gradients; called by the framework after building."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher never leaves eval mode (dropout / drop-path off), even when a parent
        # module is switched to train().
        return super().train(False)

    def fingerprint(self) -> str:
        """Identity of the weights + preprocessing, used to key feature caches."""
        from .utils import module_fingerprint

        return module_fingerprint(
            self,
            extra=(self.input_size, self.patch_size, tuple(self.mean), tuple(self.std), self.resize_mode),
        )


class Student(nn.Module):
    """The network being distilled.

    ``forward`` takes [0, 1] images (B, 3, H, W) with H and W multiples of
    ``patch_size`` (times any window constraint reported by ``size_multiple``) and returns a
    ``StudentOutput``. Factories receive ``num_cls_tokens`` from the framework: one summary
    token per teacher that has a summary target.
    """

    embed_dim: int
    patch_size: int
    num_cls_tokens: int
    #: 1-based block indices whose patch tokens ``forward`` also returns in
    #: ``StudentOutput.intermediates``; set by the framework when a teacher has a
    #: ``student_layer``. Students that cannot tap blocks leave it absent.

    @property
    def size_multiple(self) -> int:
        """Input H and W must be multiples of this."""
        return self.patch_size

    def forward(self, images: Tensor) -> StudentOutput:  # pragma: no cover - interface
        raise NotImplementedError


class Adaptor(nn.Module):
    """Maps student features (..., in_dim) to a teacher's space (..., out_dim).

    Factories are called as ``factory(in_dim=..., out_dim=..., hidden_dim=..., **recipe_args)``.
    """

    in_dim: int
    out_dim: int


@dataclass
class CropGeometry:
    """Where the student's view and a teacher's view lie in the sample's shared crop: per
    sample boxes (B, 4) as (x0, y0, x1, y1) fractions of the crop (0..1). Views differ when
    the recipe shifts teacher and student views against each other (``augment.shift``). The
    framework passes them on the CPU (they are drawn there, and output shapes that depend on
    them are then read without waiting for the device); move what a kernel needs."""

    student_box: Tensor
    teacher_box: Tensor


class Loss(nn.Module):
    """Scalar distance between a prediction and a target of the same shape.

    Summary losses get (B, D); spatial losses get (B, C, h, w) grids that the framework has
    already interpolated to the larger of the two grids. Factories are called with the
    recipe's ``args``.

    Optional extensions, detected by attribute:

    * ``wants_geometry = True``: a spatial loss gets the student and teacher grids as they come
      (not interpolated) and ``geometry=CropGeometry`` so it can compare them where the views
      overlap. With shifted views every spatial loss must want geometry.
    * statistics: ``observe(target)``, ``prepare_statistics(dim, device)``,
      ``all_reduce_(group)``, ``finalize()`` and a ``ready`` buffer. The framework feeds the
      targets of its estimation batches (the ones target norms use, in the space the loss
      sees) before the first step; the loss module lives in the distiller, so its buffers are
      saved in checkpoints.
    """

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------ evaluation
#
# A downstream task (kNN, linear probe, zero-shot, segmentation probe, fidelity, a proxy
# benchmark, a third party's own) is a plugin of kind ``evaluator``. Its factory is called with
# the task's arguments (``factory(**args)``, from ``radio eval RUN TASK --arg k=v`` or a sweep
# file's ``eval:`` section) and returns a callable ``evaluator(subject, data) -> dict``:
#
# * ``subject`` (``Subject``): one frozen feature extractor - the run's student at one input
#   resolution with its adaptor heads, a teacher at its own resolution, or a baseline (raw
#   pixels, a random-init student). Every subject is scored through the same protocol, so a
#   table compares like with like.
# * ``data`` (``EvalData``): labelled images with a train and a test split (class labels and,
#   where given, segmentation masks), or None for an evaluator that brings its own data
#   (``needs = ()``, e.g. a proxy world).
# * the result: a flat dict, metric name -> float, plus the context that makes the numbers
#   readable (``task``, ``head``, ``k``, ``train_images``, ``prompts``, ...; str / int / list
#   values). The framework adds ``subject`` and ``resolution``.
#
# Features for a whole split come from ``radio_core.eval.subjects.extract`` (batched, cached by
# subject fingerprint, resolution, data fingerprint and preprocessing), so a second task on
# the same data does not run the model again.


@dataclass
class Features:
    """What a ``Subject`` produces for a batch of N images (any may be None when the subject has
    no such output).

    summary: (N, D) image-level features (kNN, linear probe): the student's backbone summary
        (its CLS tokens concatenated), a teacher's summary; mean-pooled ``spatial`` stands in
        for a subject without one.
    spatial: (N, C, h, w) dense features (segmentation / boundary probes).
    embedding: (N, E) the image in a text tower's space (zero-shot): a CLIP teacher's image
        embedding, or the student's CLIP adaptor head's summary.
    """

    summary: Optional[Tensor]
    spatial: Optional[Tensor]
    embedding: Optional[Tensor] = None


class Subject:
    """A frozen feature extractor under evaluation (see the section comment above).

    Set ``name`` (a row of the result table, e.g. ``student@224``, ``teacher/dino``,
    ``pixels``), ``kind`` (``student`` | ``teacher`` | ``baseline``) and ``resolution`` (the
    (H, W) its input is resized or cropped to), and implement ``features``. A subject that can
    embed text for zero-shot implements ``encode_text``; ``fingerprint`` identifies weights and
    preprocessing for the feature cache (change it and cached features are not reused).
    Subjects built from a run (``radio_core.eval.subjects.StudentSubject``) also carry
    ``distiller`` (student + heads), ``teachers`` and ``run`` (recipe, run folder), which
    evaluators such as fidelity, or one that reads the run's own data, may use.
    """

    name: str
    kind: str = "baseline"
    resolution: tuple[int, int]
    #: the loaded run the subject belongs to or stands beside (``radio_core.eval.loading.LoadedRun``),
    #: when there is one: an evaluator that brings its own data may read the run's recipe.
    run: Any = None

    def features(self, images: Tensor) -> Features:  # pragma: no cover - interface
        """``images``: float (N, 3, H, W) in [0, 1] at ``resolution``; no gradients needed."""
        raise NotImplementedError

    def encode_text(self, prompts: Sequence[str]) -> Optional[Tensor]:
        """(len(prompts), E) text embeddings in ``Features.embedding``'s space, or None when the
        subject has no text tower (zero-shot is then not defined for it)."""
        return None

    def fingerprint(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Split:
    """One split of labelled data. ``images``: a sequence of PIL images (loaded on access);
    ``labels``: (N,) class ids or None; ``masks``: a sequence of (H, W) integer arrays of class
    ids (``EvalData.ignore_index`` = ignore), aligned with the images, or None."""

    images: Sequence[Any]
    labels: Optional[Tensor] = None
    masks: Optional[Sequence[Any]] = None

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class EvalData:
    """Labelled data for evaluators: a train split (fits probes, kNN memory) and a test split.

    ``classes``: class names (zero-shot prompts; image-level labels), ``mask_classes``: number of
    segmentation classes (None without masks), ``fingerprint``: identity of the files and the
    split (keys the feature cache), ``source``: where it came from (shown in results)."""

    train: Split
    test: Split
    classes: list[str]
    fingerprint: str
    source: str
    mask_classes: Optional[int] = None
    ignore_index: int = 255

    @property
    def has_labels(self) -> bool:
        return self.train.labels is not None and self.test.labels is not None

    @property
    def has_masks(self) -> bool:
        return self.train.masks is not None and self.test.masks is not None


class Evaluator:
    """A downstream task (kind ``evaluator``); see the section comment above.

    ``needs``: what ``data`` must hold, from ``images``, ``labels``, ``masks``, ``text`` (a
    subject with ``encode_text``); ``()``: the evaluator brings its own data and is called with
    ``data=None``. ``needs_teachers``: it reads the run's teachers through the subject
    (``subject.teachers``, e.g. fidelity), which the framework then loads.
    """

    name: str = "evaluator"
    needs: tuple[str, ...] = ("images", "labels")
    needs_teachers: bool = False

    def __call__(self, subject: Subject, data: Optional[EvalData]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError


KINDS = ("teacher", "student", "adaptor", "loss", "dataset", "balancer", "evaluator")
