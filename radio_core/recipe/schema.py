"""The recipe schema: pydantic models with ``extra="forbid"``, one per recipe section.

A recipe never names Python to import: components are referred to by registered plugin name only.

Types are strict: a boolean is not a step count, ``"5"`` is not a number, and NaN/inf are not
numbers either; sizes, counts, rates and betas are range-checked with the field named.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic import Strict as _StrictType

from ..utils import bounded_message, short_repr


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field (bounded in size)."""

    def __init__(self, message: str) -> None:
        super().__init__(bounded_message(str(message)))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


#: largest accepted image edge (pixels) and count (steps, batch, ranks, ...).
MAX_SIZE = 16384
MAX_COUNT = 2**31 - 1

# Strict scalars: no bool -> int, no str -> number, no float -> int; floats accept ints.
Int = Annotated[int, _StrictType()]
Float = Annotated[float, _StrictType()]
Bool = StrictBool
Count = Annotated[int, _StrictType(), Field(ge=1, le=MAX_COUNT)]
Count0 = Annotated[int, _StrictType(), Field(ge=0, le=MAX_COUNT)]
Edge = Annotated[int, _StrictType(), Field(ge=1, le=MAX_SIZE)]
Size = tuple[Edge, Edge]
Name = Annotated[str, Field(min_length=1, max_length=200)]


def _size(v: Any) -> Any:
    """224 -> (224, 224); [h, w] -> (h, w)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    return v


#: a teacher name becomes a key of torch ModuleDicts, state-dict prefixes and metric names.
TEACHER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")


def teacher_name_problem(name: Any) -> Optional[str]:
    """Why ``name`` cannot name a teacher (None when it can)."""
    import torch

    if not isinstance(name, str) or not TEACHER_NAME.fullmatch(name):
        return (f"teacher name {short_repr(name)} is not usable as a module key: use letters, digits, '_' "
                f"or '-', starting with a letter or '_', at most 64 characters")
    if hasattr(torch.nn.ModuleDict(), name):
        return f"teacher name {name!r} is reserved (an attribute of torch.nn.ModuleDict); choose another"
    return None


class ComponentSpec(Strict):
    """A registered plugin name plus the keyword arguments its factory takes."""

    name: Name
    args: dict[str, Any] = Field(default_factory=dict)


def _resolutions(v: Any) -> Any:
    """224 | [h, w] | [224, [h, w], ...] -> a list of sizes."""
    def scalar(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if scalar(v) or isinstance(v, tuple) or (isinstance(v, list) and len(v) == 2 and all(scalar(x) for x in v)):
        v = [v]
    return [_size(x) for x in v] if isinstance(v, list) else v


class LoraSpec(Strict):
    """Low-rank adapters (``peft``'s LoRA) on the student's Linear layers named in ``target_modules``."""

    r: Count = 8
    alpha: Float = Field(16.0, gt=0, le=1e6)
    dropout: Float = Field(0.0, ge=0, lt=1)
    target_modules: list[Name] = Field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"], min_length=1)


class InitSpec(Strict):
    """Start from a released model (radio_core.formats.release): its backbone, and the heads and
    target statistics of the teachers it knows; the other teachers get fresh heads."""

    #: an official RADIO checkpoint (.pth.tar), a transformers RadioModel folder (C-RADIO), or a
    #: radio-distill export
    source: Name
    #: what trains: all (continue training), heads (backbone frozen), new_heads (backbone and the
    #: released heads frozen: only new teachers' heads), lora (backbone frozen, LoRA adapters on it)
    train: Literal["all", "heads", "new_heads", "lora"] = "all"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    #: this recipe's teacher -> the released model's teacher whose heads it reuses (default: the
    #: same name, where the release has it)
    teachers: dict[Name, Name] = Field(default_factory=dict)


class StudentSpec(ComponentSpec):
    #: training resolution(s) of the student's input; several = multi-resolution training,
    #: one sampled per step.
    resolution: list[Size] = Field(default_factory=lambda: [(224, 224)], min_length=1)
    #: start from a released model instead of random weights (its architecture is the student's)
    init: Optional[InitSpec] = None

    @field_validator("resolution", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        return _resolutions(v)


class UpsamplerSpec(Strict):
    """A learned upsampler of one teacher's spatial features (FeatSharp, Ranzinger et al., ICML
    2025), trained beforehand by ``radio featsharp RECIPE --teacher NAME``: the teacher then runs
    on its input and on ``factor`` x ``factor`` tiles of a ``factor``-times larger input, and the
    upsampler fuses them into a ``factor``-times finer grid (C-RADIOv4: SigLIP2 at 3x)."""

    name: Literal["featsharp"]
    factor: Annotated[int, _StrictType(), Field(ge=2, le=8)]
    #: the ``.safetensors`` file ``radio featsharp`` wrote; None: its fingerprinted cache
    #: (``~/.cache/radio_distill/featsharp/``, keyed by the teacher's weights, resolution and factor).
    path: Optional[Name] = None
    #: the groups whose ranks use it (e.g. only the high-resolution one); None: every group.
    groups: Optional[list[Name]] = Field(None, min_length=1)


class TeacherSpec(Strict):
    #: registered teacher plugin name (``python -m radio_core.plugins`` lists them).
    plugin: Name
    args: dict[str, Any] = Field(default_factory=dict)
    #: input resolution the teacher runs at; None = the teacher's own default.
    resolution: Optional[Size] = None
    #: overall weight of this teacher's losses, and the split between its two heads.
    weight: Float = Field(1.0, ge=0, le=1e4)
    summary_weight: Float = Field(1.0, ge=0, le=1e4)
    spatial_weight: Float = Field(1.0, ge=0, le=1e4)
    summary_loss: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="cosine"))
    spatial_loss: ComponentSpec = Field(default_factory=lambda: ComponentSpec(
        name="cosine_smooth_l1", args={"cosine": 0.9, "smooth_l1": 0.1}))
    #: adaptor override for this teacher (default: the recipe's ``adaptor``); per head, when they
    #: differ (a released model's heads): ``summary_adaptor`` / ``spatial_adaptor``. An adaptor's
    #: ``args.hidden_dim`` overrides the default (the largest teacher dimension).
    adaptor: Optional[ComponentSpec] = None
    summary_adaptor: Optional[ComponentSpec] = None
    spatial_adaptor: Optional[ComponentSpec] = None
    #: use the summary target (if the teacher has one).
    use_summary: Bool = True
    use_spatial: Bool = True
    #: normalise this teacher's targets with statistics estimated over ``train.target_norm_batches``
    #: batches when it first trains (optionally re-estimated, ``train.target_norm_steps``; stored in
    #: checkpoints and exports). One kind for both targets, or per target: ``{summary: none,
    #: spatial: phi_s}`` (e.g. to keep summaries un-centred for the ``angle_balanced`` loss while
    #: PHI-S balances the features).
    target_norm: Union[Literal["none", "standardize", "phi_s"],
                       dict[Literal["summary", "spatial"], Literal["none", "standardize", "phi_s"]]] = "none"
    #: intermediate-layer target: this teacher's spatial head reads the student's tokens after
    #: block ``student_layer`` (1-based) instead of the last block (pair it with a teacher whose
    #: target is an intermediate layer, e.g. ``args: {layer: 12}``); needs ``use_summary: false``.
    student_layer: Optional[int] = Field(None, ge=1)
    #: learned upsampling of the spatial target (``{name: featsharp, factor: 3}``); None: the
    #: grids are matched by bilinear interpolation (AM-RADIO's rule).
    upsampler: Optional[UpsamplerSpec] = None

    @field_validator("resolution", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        return _size(v)

    @model_validator(mode="after")
    def _some_target(self) -> "TeacherSpec":
        if not (self.use_summary or self.use_spatial):
            raise ValueError("use_summary and use_spatial are both false: this teacher gives no target to learn")
        return self

    def learning_weight(self) -> float:
        """What this teacher's losses count for in total (0: the student learns nothing from it)."""
        return self.weight * (self.summary_weight * self.use_summary + self.spatial_weight * self.use_spatial)

    @model_validator(mode="after")
    def _intermediate(self) -> "TeacherSpec":
        if self.student_layer is not None and self.use_summary:
            raise ValueError("student_layer (an intermediate-layer target) needs use_summary: false: the student's "
                             "intermediate blocks give patch tokens only")
        return self


class AugmentSpec(Strict):
    #: random resized crop: area fraction and aspect-ratio range (torchvision semantics).
    scale: tuple[Float, Float] = (0.25, 1.0)
    ratio: tuple[Float, Float] = (3 / 4, 4 / 3)
    hflip: Float = Field(0.5, ge=0, le=1)
    #: K fixed augmentations per image instead of a fresh one per sample (what a teacher-feature
    #: cache stores; set it to compare cached and online training on the same crops).
    views: Optional[Annotated[int, _StrictType(), Field(ge=1, le=4096)]] = None
    #: shift-equivariant distillation: the student and each teacher group see their own window
    #: of the crop (side ``1 - shift``, random offsets, so views differ by up to ``shift`` of the
    #: crop); spatial losses then compare on the aligned overlap (``shift_equivariant``). 0: off.
    shift: Float = Field(0.0, ge=0, lt=0.5)

    @model_validator(mode="after")
    def _ranges(self) -> "AugmentSpec":
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("scale must satisfy 0 < min <= max <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1] <= 100:
            raise ValueError("ratio must satisfy 0 < min <= max <= 100")
        return self


class DataSpec(Strict):
    source: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="skimage_samples"))
    batch_size: Count = Field(8, description="per-process batch size")
    num_workers: Annotated[int, _StrictType(), Field(ge=0, le=1024)] = 0
    #: batches read ahead in a background thread when ``num_workers`` is 0 (decoding, cropping
    #: and teacher-feature cache reads overlap the step; worth it for big students, where the
    #: step is long); 0 reads in the training loop.
    prefetch: Annotated[int, _StrictType(), Field(ge=0, le=1024)] = 0
    #: write each rank's sample ids per step to ``samples_rank{r}.jsonl`` (audits data order).
    log_samples: Bool = False
    #: samples the decoder refuses are skipped and counted (``bad_images``); the run stops when
    #: more than this fraction of the samples seen are bad (judged over at least 1000 samples,
    #: so that a few bad files early on do not stop it).
    max_bad_fraction: Float = Field(0.01, ge=0, le=1)
    #: edge length the loader decodes each crop to before per-teacher resizing; None = the
    #: largest resolution any student or teacher needs.
    crop_size: Optional[Size] = None

    @field_validator("crop_size", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        return _size(v)


class OptimSpec(Strict):
    name: Literal["adamw"] = "adamw"
    lr: Float = Field(1e-3, gt=0, le=1)
    weight_decay: Float = Field(0.02, ge=0, le=10)
    betas: tuple[Annotated[float, _StrictType(), Field(ge=0, lt=1)],
                 Annotated[float, _StrictType(), Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: Float = Field(1e-8, gt=0, le=1)
    #: torch's fused AdamW kernel; null: on wherever torch has it for the device (not under
    #: train.fsdp). It also skips a non-finite step on the device, without a host sync.
    fused: Optional[Bool] = None


class ScheduleSpec(Strict):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: Count0 = 0
    #: final LR as a fraction of the base LR.
    min_lr_ratio: Float = Field(0.0, ge=0, le=1)


class FSDPSpec(Strict):
    """Shard the student + heads over all ranks (FSDP2 through Accelerate), for students that do
    not fit replicated. Teachers are never sharded: each rank keeps the ones its group runs."""

    enabled: Bool = False
    #: class names sharded as one unit each (e.g. timm's ``Block``): one unit's parameters are
    #: gathered at a time. Empty: units by size (``min_num_params``), the rest in the root unit.
    wrap: list[Name] = Field(default_factory=list)
    min_num_params: Annotated[int, _StrictType(), Field(ge=1)] = 100_000_000
    #: free gathered parameters after each unit's forward (less memory, one more all-gather in
    #: backward).
    reshard_after_forward: Bool = True
    #: keep sharded parameters, gradients and optimiser states in host memory.
    cpu_offload: Bool = False
    #: checkpoints: "sharded" (each rank writes its shard; torch.distributed.checkpoint, loads
    #: on another world size) or "full" (gathered to rank 0).
    checkpoint: Literal["sharded", "full"] = "sharded"


class MesaSpec(Strict):
    """MESA (Du et al., NeurIPS 2022, "Sharpness-Aware Training for Free"): an exponential moving
    average of the student (and heads) is kept as a second target; from ``start_step`` on the
    objective adds ``weight`` x the distance of every head's output to the EMA model's output
    on the same input. The EMA is updated after every optimiser step and saved in checkpoints.
    Defaults: the MESA reference script's ImageNet run (``--reinforce 0.8``, timm EMA decay
    0.9998); its ``kl_start_epoch`` is ``start_step`` here."""

    weight: Float = Field(0.8, gt=0, le=1e4)
    decay: Float = Field(0.9998, gt=0, lt=1)
    start_step: Count0 = 0


class DampSpec(Strict):
    """DAMP (Trinh et al., NeurIPS 2024, "Improving robustness to corruptions with multiplicative
    weight perturbations"): every micro-step's forward and backward run with the student's
    Linear weights multiplied by 1 + std * N(0, 1) noise, drawn from (seed, step, slot,
    micro-step); the update applies to the unperturbed weights. The DAMP reference configs use
    std 0.1 (ViT-S) and 0.15 (ViT-B) on ImageNet."""

    std: Float = Field(gt=0, le=1)


class TrainSpec(Strict):
    steps: Count = 100
    grad_accum: Annotated[int, _StrictType(), Field(ge=1, le=65536)] = 1
    grad_clip: Optional[Float] = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    #: log scalars every N steps (a host sync happens only then).
    log_every: Count = 10
    seed: Annotated[int, _StrictType(), Field(ge=0, le=2**32 - 1)] = 0
    #: dtype of the frozen teachers' weights: "auto" = bf16/fp16 with mixed precision on a GPU
    #: (halves their memory), fp32 otherwise.
    teacher_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: batches (per rank) used to estimate teacher-target statistics (teachers.*.target_norm);
    #: each teacher's are estimated when it first trains (its first stage).
    target_norm_batches: Annotated[int, _StrictType(), Field(ge=1, le=100000)] = 4
    #: torch CPU threads per process; None chooses from the free cores and the local process
    #: count (radio_core.train.threads), or takes OMP_NUM_THREADS when set.
    cpu_threads: Optional[Annotated[int, _StrictType(), Field(ge=1, le=4096)]] = None
    #: re-estimate them (from fresh batches) every ``target_norm_every`` steps during a teacher's
    #: first ``target_norm_steps`` training steps, then keep them (PHI-S practice: ~3000 / 100).
    target_norm_steps: Annotated[int, _StrictType(), Field(ge=0, le=10**9)] = 0
    target_norm_every: Annotated[int, _StrictType(), Field(ge=1, le=10**9)] = 100
    #: torch.compile the student and the adaptor heads (radio_core.train.compiled); the first
    #: step at each new input shape pays the compile time.
    compile: Bool = False
    #: shapes of the compiled graphs: null = torch's choice (static, then dynamic once a second
    #: resolution appears), false = one compile per resolution, true = dynamic from the start.
    compile_dynamic: Optional[Bool] = None
    #: channels_last memory format for the student's convolutions (E-RADIO-like students).
    channels_last: Bool = False
    #: skip the optimiser update when the loss is not finite (one host sync per step) ...
    skip_nonfinite: Bool = True
    #: ... and stop with an error after this many such steps in a row.
    max_nonfinite_steps: Count = 5
    fsdp: FSDPSpec = Field(default_factory=FSDPSpec)
    #: robustness regularisers of the C-RADIO reports, off by default (see MesaSpec, DampSpec).
    mesa: Optional[MesaSpec] = None
    damp: Optional[DampSpec] = None

    @model_validator(mode="after")
    def _unsharded_regularisers(self) -> "TrainSpec":
        on = [k for k in ("mesa", "damp") if getattr(self, k) is not None]
        if on and self.fsdp.enabled:
            raise ValueError(f"{' and '.join(on)} cannot be combined with fsdp yet (the EMA copy and the weight "
                             "noise work on whole, unsharded weights)")
        return self


class CheckpointSpec(Strict):
    every: Count = 1000
    keep: Count = 3
    #: also write the standalone student + adaptor export at the end.
    export: Bool = True


class CacheSpec(Strict):
    """Read some teachers' targets from a cache built by ``radio cache``."""

    path: Name
    #: teachers served from the cache (default: every recipe teacher the cache holds); the
    #: others run online.
    teachers: Optional[list[Name]] = None
    #: rebuild each cached teacher once at start to check its weights fingerprint.
    verify: Bool = True


class EvalSpec(Strict):
    """Evaluation during and after training (radio_core.eval)."""

    #: held-out images for fidelity numbers and pictures.
    source: ComponentSpec = Field(default_factory=lambda: ComponentSpec(
        name="skimage_samples", args={"names": ["astronaut", "coffee", "chelsea", "rocket"],
                                      "include_sklearn": False}))
    #: run the fidelity evaluation every N steps (0 = never) and log it to TensorBoard/JSONL.
    every: Count0 = 0
    images: Annotated[int, _StrictType(), Field(ge=1, le=100000)] = 4
    #: student resolutions for fidelity (default: every resolution the student trains at).
    resolutions: Optional[list[Edge]] = Field(None, min_length=1)
    #: write report/ (report.md + PNGs) at the end of training.
    report: Bool = False


class LoggingSpec(Strict):
    tensorboard: Bool = True
    jsonl: Bool = True
    progress: Bool = True


class GroupSpec(Strict):
    """Teachers that run together on one partition of the ranks (AM-RADIO's teacher groups)."""

    teachers: list[Name] = Field(min_length=1)
    #: fraction of the ranks given to this group (shares of all groups must sum to 1) ...
    share: Optional[Float] = Field(None, gt=0, le=1)
    #: ... or an exact number of ranks.
    ranks: Optional[Annotated[int, _StrictType(), Field(ge=1, le=1_000_000)]] = None
    #: per-rank batch size of this group (default: data.batch_size).
    batch_size: Optional[Count] = None
    #: student input resolution(s) on this group's ranks (default: student.resolution), or the
    #: name of one of the recipe's ``resolution_sets``; one is drawn per step (the same on every
    #: rank of the group, so each rank keeps one shape per step).
    student_resolution: Optional[Union[Name, Annotated[list[Size], Field(min_length=1)]]] = None
    #: teacher input resolutions on this group's ranks, overriding ``teachers.<name>.resolution``
    #: (RADIOv2.5: every teacher at a low and a high resolution, in two groups).
    teacher_resolution: dict[Name, Size] = Field(default_factory=dict)
    #: mosaic augmentation (C-RADIOv4 distils SAM3 from mosaics at 1152 px): every ``mosaic`` x
    #: ``mosaic`` images of this group's batch are tiled into one canvas, which the student and
    #: the group's teachers all see; batch_size must be a multiple of mosaic^2. None: off.
    mosaic: Optional[Annotated[int, _StrictType(), Field(ge=2, le=8)]] = None

    @field_validator("student_resolution", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        return v if v is None or isinstance(v, str) else _resolutions(v)

    @field_validator("teacher_resolution", mode="before")
    @classmethod
    def _teacher_res(cls, v: Any) -> Any:
        return {k: _size(x) for k, x in v.items()} if isinstance(v, dict) else v


class StageSpec(Strict):
    """One training stage: its own teachers, groups and resolutions; the LR schedule spans
    all stages unless ``restart_schedule``."""

    name: Optional[Name] = None
    steps: Count
    #: teachers trained in this stage (default: all of ``teachers``).
    teachers: Optional[list[Name]] = Field(None, min_length=1)
    #: rank groups for this stage (default: the recipe's ``groups``, or one group).
    groups: Optional[dict[Name, GroupSpec]] = Field(None, min_length=1)
    #: resolution(s) or the name of a ``resolution_sets`` entry (as for groups)
    student_resolution: Optional[Union[Name, Annotated[list[Size], Field(min_length=1)]]] = None
    restart_schedule: Bool = False

    @field_validator("student_resolution", mode="before")
    @classmethod
    def _res(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        return None if v is None else _resolutions(v)


class Recipe(Strict):
    output_dir: Name = "runs/default"
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
    groups: Optional[dict[Name, GroupSpec]] = Field(None, min_length=1)
    #: training stages (default: one stage of train.steps with every teacher).
    stages: Optional[list[StageSpec]] = Field(None, min_length=1)
    #: teacher balancing plugin (kind ``balancer``, e.g. ``{name: teacher_dropping}``): per-image
    #: weights for the teachers of a slot from their losses. None: every teacher always counts.
    balance: Optional[ComponentSpec] = None
    #: named partitions of student resolutions for stochastic multi-resolution training, e.g.
    #: ``{low: [128, 192, 224, 256, 384, 432], high: [512, 768, 1024, 1152]}`` (C-RADIOv4); groups
    #: and stages name them in ``student_resolution``.
    resolution_sets: dict[str, list[Size]] = Field(default_factory=dict)

    @field_validator("resolution_sets", mode="before")
    @classmethod
    def _sets(cls, v: Any) -> Any:
        # a set is a list of sizes: [128, 192] is two square sizes (not one 128x192 size)
        return {k: [_size(y) for y in x] if isinstance(x, list) else x for k, x in v.items()} \
            if isinstance(v, dict) else v

    def resolutions(self, value: Any) -> Optional[list[Size]]:
        """A ``student_resolution`` value as a list of sizes (a set name resolved)."""
        if isinstance(value, str):
            return list(self.resolution_sets[value])
        return value

    def student_resolutions(self) -> list[Size]:
        """Every student input size the run trains at (``student.resolution``, each group's and
        stage's ``student_resolution``, sets resolved), in first-seen order."""
        found = list(self.student.resolution)
        for st in self.stages or []:
            found += self.resolutions(st.student_resolution) or []
            found += [s for g in (st.groups or {}).values() for s in self.resolutions(g.student_resolution) or []]
        found += [s for g in (self.groups or {}).values() for s in self.resolutions(g.student_resolution) or []]
        return list(dict.fromkeys(tuple(s) for s in found))

    @field_validator("output_dir")
    @classmethod
    def _printable_path(cls, v: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("contains a NUL or another control character; not usable as a path")
        return v

    @field_validator("teachers")
    @classmethod
    def _some_teachers(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one teacher is required")
        for name in v:
            problem = teacher_name_problem(name)
            if problem:
                raise ValueError(problem)
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

        def check_set(value: Any, where: str) -> None:
            if isinstance(value, str) and value not in self.resolution_sets:
                sets = ", ".join(sorted(self.resolution_sets)) or "none defined"
                raise ValueError(f"{where}: {value!r} is not one of the recipe's resolution_sets ({sets})")

        def check_groups(groups: dict[str, GroupSpec], stage_teachers: list[str], where: str) -> None:
            seen: list[str] = []
            for gname, g in groups.items():
                check_names(g.teachers, f"{where}.{gname}.teachers")
                check_set(g.student_resolution, f"{where}.{gname}.student_resolution")
                stray = sorted(set(g.teacher_resolution) - set(g.teachers))
                if stray:
                    raise ValueError(f"{where}.{gname}.teacher_resolution: {stray} are not teachers of this group")
                seen += g.teachers
                if g.mosaic is not None:
                    batch = g.batch_size or self.data.batch_size
                    if batch % g.mosaic ** 2:
                        raise ValueError(f"{where}.{gname}.mosaic: batch size {batch} is not a multiple of "
                                         f"{g.mosaic}x{g.mosaic}={g.mosaic ** 2} (the images of one canvas)")
                if g.share is not None and g.ranks is not None:
                    raise ValueError(f"{where}.{gname}: give share or ranks, not both")
            missing = set(stage_teachers) - set(seen)
            if missing:
                raise ValueError(f"{where}: teachers {sorted(missing)} are in no group")
            shares = [g.share for g in groups.values() if g.share is not None]
            if shares and len(shares) == len(groups) and abs(sum(shares) - 1) > 1e-6:
                raise ValueError(f"{where}: group shares sum to {sum(shares):g}, not 1")

        def check_weights(names: list[str], where: str) -> None:
            if names and not any(self.teachers[n].learning_weight() > 0 for n in names if n in self.teachers):
                raise ValueError(f"{where}: every teacher's loss weight is 0 (weight x summary_weight / "
                                 f"spatial_weight): the student would learn nothing; give one a weight > 0")

        if not self.stages:
            check_weights(list(self.teachers), "teachers")
        if self.groups:
            check_groups(self.groups, list(self.teachers) if not self.stages else [], "groups")
        group_names = set(self.groups or {}) | {n for st in self.stages or [] for n in (st.groups or {})}
        for tname, spec in self.teachers.items():
            up = spec.upsampler
            if up is not None and up.groups is not None:
                stray = sorted(set(up.groups) - group_names)
                if stray:
                    raise ValueError(f"teachers.{tname}.upsampler.groups: {stray} are not groups of this recipe "
                                     f"({', '.join(sorted(group_names)) or 'none defined'})")
        if self.stages:
            total = sum(s.steps for s in self.stages)
            if total > MAX_COUNT:
                raise ValueError(f"the stages add up to {total} steps, more than {MAX_COUNT}")
            if "steps" in self.train.model_fields_set and self.train.steps != total:
                raise ValueError(f"train.steps is {self.train.steps} but the stages add up to {total} steps")
            self.train.steps = total
            for i, st in enumerate(self.stages):
                stage_teachers = st.teachers if st.teachers is not None else list(self.teachers)
                check_names(stage_teachers, f"stages.{i}.teachers")
                check_weights(stage_teachers, f"stages.{i}.teachers")
                check_set(st.student_resolution, f"stages.{i}.student_resolution")
                groups = st.groups or self.groups
                if groups:
                    check_groups(groups, stage_teachers, f"stages.{i}.groups" if st.groups else "groups")
        return self
