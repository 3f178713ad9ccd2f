"""The recipe schema: pydantic models with ``extra="forbid"``, one per recipe section.

A recipe never names Python to import: components are referred to by registered plugin name only.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _size(v: Any) -> Any:
    """224 -> (224, 224); [h, w] -> (h, w)."""
    if isinstance(v, int):
        return (v, v)
    return v


Size = tuple[int, int]


class ComponentSpec(Strict):
    """A registered plugin name plus the keyword arguments its factory takes."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class StudentSpec(ComponentSpec):
    #: training resolution(s) of the student's input; several = multi-resolution training,
    #: one sampled per step.
    resolution: list[Size] = Field(default_factory=lambda: [(224, 224)])

    @field_validator("resolution", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        if isinstance(v, (int, tuple)) or (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)):
            v = [v]
        return [_size(x) for x in v]


class TeacherSpec(Strict):
    #: registered teacher plugin name (``python -m radio_core.plugins`` lists them).
    plugin: str
    args: dict[str, Any] = Field(default_factory=dict)
    #: input resolution the teacher runs at; None = the teacher's own default.
    resolution: Optional[Size] = None
    #: overall weight of this teacher's losses, and the split between its two heads.
    weight: float = Field(1.0, ge=0)
    summary_weight: float = Field(1.0, ge=0)
    spatial_weight: float = Field(1.0, ge=0)
    summary_loss: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="cosine"))
    spatial_loss: ComponentSpec = Field(default_factory=lambda: ComponentSpec(
        name="cosine_smooth_l1", args={"cosine": 0.9, "smooth_l1": 0.1}))
    #: adaptor override for this teacher (default: the recipe's ``adaptor``).
    adaptor: Optional[ComponentSpec] = None
    #: use the summary target (if the teacher has one).
    use_summary: bool = True
    use_spatial: bool = True
    #: normalise this teacher's targets with statistics estimated over the first
    #: ``train.target_norm_batches`` batches (stored in checkpoints and exports).
    target_norm: Literal["none", "standardize", "phi_s"] = "none"

    @field_validator("resolution", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        return _size(v)


class AugmentSpec(Strict):
    #: random resized crop: area fraction and aspect-ratio range (torchvision semantics).
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0, le=1)
    #: K fixed augmentations per image instead of a fresh one per sample (what a teacher-feature
    #: cache stores; set it to compare cached and online training on the same crops).
    views: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> "AugmentSpec":
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("scale must satisfy 0 < min <= max <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError("ratio must satisfy 0 < min <= max")
        return self


class DataSpec(Strict):
    source: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="skimage_samples"))
    batch_size: int = Field(8, ge=1, description="per-process batch size")
    num_workers: int = Field(0, ge=0)
    #: batches read ahead in a background thread when ``num_workers`` is 0 (decoding, cropping
    #: and teacher-feature cache reads overlap the step; worth it for big students, where the
    #: step is long); 0 reads in the training loop.
    prefetch: int = Field(0, ge=0)
    #: write each rank's sample ids per step to ``samples_rank{r}.jsonl`` (audits data order).
    log_samples: bool = False
    #: edge length the loader decodes each crop to before per-teacher resizing; None = the
    #: largest resolution any student or teacher needs.
    crop_size: Optional[Size] = None

    @field_validator("crop_size", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        return _size(v)


class OptimSpec(Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.02, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: Optional[bool] = None


class ScheduleSpec(Strict):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    #: final LR as a fraction of the base LR.
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TrainSpec(Strict):
    steps: int = Field(100, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    #: log scalars every N steps (a host sync happens only then).
    log_every: int = Field(10, ge=1)
    seed: int = 0
    #: dtype of the frozen teachers' weights: "auto" = bf16/fp16 with mixed precision on a GPU
    #: (halves their memory), fp32 otherwise.
    teacher_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: batches (per rank) used to estimate teacher-target statistics (teachers.*.target_norm).
    target_norm_batches: int = Field(4, ge=1)
    #: torch.compile the student (and heads); the first steps pay the compile time.
    compile: bool = False
    #: channels_last memory format for the student's convolutions (E-RADIO-like students).
    channels_last: bool = False
    #: skip the optimiser update when the loss is not finite (one host sync per step) ...
    skip_nonfinite: bool = True
    #: ... and stop with an error after this many such steps in a row.
    max_nonfinite_steps: int = Field(5, ge=1)


class CheckpointSpec(Strict):
    every: int = Field(1000, ge=1)
    keep: int = Field(3, ge=1)
    #: also write the standalone student + adaptor export at the end.
    export: bool = True


class CacheSpec(Strict):
    """Read some teachers' targets from a cache built by ``python -m radio_core.cache``."""

    path: str
    #: teachers served from the cache (default: every recipe teacher the cache holds); the
    #: others run online.
    teachers: Optional[list[str]] = None
    #: rebuild each cached teacher once at start to check its weights fingerprint.
    verify: bool = True


class EvalSpec(Strict):
    """Evaluation during and after training (radio_core.eval)."""

    #: held-out images for fidelity numbers and pictures.
    source: ComponentSpec = Field(default_factory=lambda: ComponentSpec(
        name="skimage_samples", args={"names": ["astronaut", "coffee", "chelsea", "rocket"],
                                      "include_sklearn": False}))
    #: run the fidelity evaluation every N steps (0 = never) and log it to TensorBoard/JSONL.
    every: int = Field(0, ge=0)
    images: int = Field(4, ge=1)
    #: student resolutions for fidelity (default: the training resolution).
    resolutions: Optional[list[int]] = None
    #: write report/ (report.md + PNGs) at the end of training.
    report: bool = False


class LoggingSpec(Strict):
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True


class GroupSpec(Strict):
    """Teachers that run together on one partition of the ranks (AM-RADIO's teacher groups)."""

    teachers: list[str]
    #: fraction of the ranks given to this group (shares of all groups must sum to 1) ...
    share: Optional[float] = Field(None, gt=0, le=1)
    #: ... or an exact number of ranks.
    ranks: Optional[int] = Field(None, ge=1)
    #: per-rank batch size of this group (default: data.batch_size).
    batch_size: Optional[int] = Field(None, ge=1)
    #: student input resolution(s) on this group's ranks (default: student.resolution).
    student_resolution: Optional[list[Size]] = None

    @field_validator("student_resolution", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        return None if v is None else StudentSpec._res(v)


class StageSpec(Strict):
    """One training stage: its own teachers, groups and resolutions; the LR schedule spans
    all stages unless ``restart_schedule``."""

    name: Optional[str] = None
    steps: int = Field(ge=1)
    #: teachers trained in this stage (default: all of ``teachers``).
    teachers: Optional[list[str]] = None
    #: rank groups for this stage (default: the recipe's ``groups``, or one group).
    groups: Optional[dict[str, GroupSpec]] = None
    student_resolution: Optional[list[Size]] = None
    restart_schedule: bool = False

    @field_validator("student_resolution", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        return None if v is None else StudentSpec._res(v)


class Recipe(Strict):
    output_dir: str = "runs/default"
    student: StudentSpec
    teachers: dict[str, TeacherSpec]
    adaptor: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="mlp"))
    data: DataSpec = Field(default_factory=DataSpec)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    cache: Optional[CacheSpec] = None
    eval: EvalSpec = Field(default_factory=EvalSpec)
    #: rank groups (default: every rank runs every teacher).
    groups: Optional[dict[str, GroupSpec]] = None
    #: training stages (default: one stage of train.steps with every teacher).
    stages: Optional[list[StageSpec]] = None

    @field_validator("teachers")
    @classmethod
    def _some_teachers(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one teacher is required")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        known = set(self.teachers)

        def check_names(names: list[str], where: str) -> None:
            from ..utils import closest

            for n in names:
                if n not in known:
                    guess = closest(n, known)
                    hint = f"; did you mean {guess!r}?" if guess else ""
                    raise ValueError(f"{where}: teacher {n!r} is not defined under teachers "
                                     f"({', '.join(sorted(known))}){hint}")

        def check_groups(groups: dict[str, GroupSpec], stage_teachers: list[str], where: str) -> None:
            seen: list[str] = []
            for gname, g in groups.items():
                check_names(g.teachers, f"{where}.{gname}.teachers")
                seen += g.teachers
                if g.share is not None and g.ranks is not None:
                    raise ValueError(f"{where}.{gname}: give share or ranks, not both")
            missing = set(stage_teachers) - set(seen)
            if missing:
                raise ValueError(f"{where}: teachers {sorted(missing)} are in no group")
            shares = [g.share for g in groups.values() if g.share is not None]
            if shares and len(shares) == len(groups) and abs(sum(shares) - 1) > 1e-6:
                raise ValueError(f"{where}: group shares sum to {sum(shares):g}, not 1")

        if self.groups:
            check_groups(self.groups, list(self.teachers) if not self.stages else [], "groups")
        if self.stages:
            total = sum(s.steps for s in self.stages)
            if "steps" in self.train.model_fields_set and self.train.steps != total:
                raise ValueError(f"train.steps is {self.train.steps} but the stages add up to {total} steps")
            self.train.steps = total
            for i, st in enumerate(self.stages):
                stage_teachers = st.teachers if st.teachers is not None else list(self.teachers)
                check_names(stage_teachers, f"stages.{i}.teachers")
                groups = st.groups or self.groups
                if groups:
                    check_groups(groups, stage_teachers, f"stages.{i}.groups" if st.groups else "groups")
        return self
