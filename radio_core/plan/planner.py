"""Dry-run planner: size a run before renting the cluster.

Builds every model on the meta device (no weights, no memory, no download), counts FLOPs per
image with ``torch.utils.flop_counter.FlopCounterMode`` (student forward + backward, each
teacher's forward), and estimates per-rank memory (weights, gradients + AdamW states,
activations saved for backward), per stage and group, for a given world size.

    python -m radio_core.run RECIPE --dry-run --world-size 64 [--gpu-memory 80]

Groups whose estimate exceeds the GPU's memory (less a reserve) are flagged with the levers that
would make them fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..models.distiller import build_distiller
from ..models.teachers import build_teacher
from ..recipe import Recipe
from ..registry import Registry
from ..utils import linear_weights
from .activations import saved_bytes
from .partition import describe, plan_stages

GiB = 1024**3


@dataclass
class ModelCost:
    params: int
    flops_per_image: float  # forward (teachers) or forward + backward (student)
    activation_bytes_per_image: float = 0.0  # kept for backward, as stored under the run's precision
    fixed_activation_bytes: float = 0.0  # per step whatever the batch (e.g. autocast's weight copies)
    forward_flops_per_image: float = 0.0  # the forward alone (what MESA's EMA copy costs; student only)


@dataclass
class GroupPlan:
    stage: str
    group: str
    ranks: int
    batch_size: int
    student_resolution: tuple[int, int]
    student: ModelCost
    teachers: dict[str, ModelCost] = field(default_factory=dict)
    weight_bytes: float = 0.0
    optimizer_bytes: float = 0.0
    activation_bytes: float = 0.0
    #: stochastic multi-resolution: the student costs at each resolution the group draws from
    #: (uniformly, one per step), in the order of ``Slot.student_resolution``.
    student_by_resolution: list[ModelCost] = field(default_factory=list)
    #: inputs per rank and micro-step when they differ from ``batch_size`` (a mosaic of k x k
    #: images per canvas: batch_size / k^2); FLOPs and activations are per input.
    forwards: Optional[int] = None
    mosaic: Optional[int] = None
    #: MESA runs the EMA copy of student + heads forward on every input (train.mesa)
    mesa: bool = False
    #: teacher -> FeatSharp factor, for the teachers this group upsamples
    upsampled: dict[str, int] = field(default_factory=dict)
    #: bytes of the regularisers' weight copies (MESA's EMA, DAMP's clean Linear weights), part
    #: of ``weight_bytes``
    regularizer_bytes: float = 0.0

    @property
    def inputs(self) -> int:
        return self.forwards or self.batch_size

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.optimizer_bytes + self.activation_bytes

    def per_input_flops(self, student: ModelCost) -> float:
        """Student fwd + bwd (+ MESA's EMA forward) and every teacher's forward, per input."""
        mesa = student.forward_flops_per_image if self.mesa else 0.0
        return student.flops_per_image + mesa + sum(t.flops_per_image for t in self.teachers.values())

    @property
    def flops_per_rank_step(self) -> float:
        """At the group's largest student resolution (the worst case)."""
        return self.per_input_flops(self.student) * self.inputs

    def step_flops(self, choice: int) -> float:
        """Per-rank FLOPs of a step whose resolution draw is ``choice`` (index mod set size)."""
        costs = self.student_by_resolution or [self.student]
        return self.per_input_flops(costs[choice % len(costs)]) * self.inputs

    @property
    def expected_flops_per_rank_step(self) -> float:
        n = len(self.student_by_resolution) or 1
        return sum(self.step_flops(i) for i in range(n)) / n


def _math_attention():
    # The fused CPU attention kernels are invisible to FlopCounterMode; the math path is counted.
    return sdpa_kernel(SDPBackend.MATH)


def count_flops(fn) -> float:
    with _math_attention(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def student_cost(distiller, resolution: tuple[int, int], device: str = "meta",
                 mixed_precision: str = "no", active: Optional[list[str]] = None) -> ModelCost:
    """``_one_student_cost`` for the most expensive of the choices a training step draws at random
    (a student's ``window_options``: ViTDet window sizes), so that the plan is the same on every
    call and its memory is an upper bound. Attention over larger windows costs more in FLOPs and
    memory, global attention (None) most: that one is costed."""
    student = distiller.student
    drawn = getattr(student, "window_sizes", None)
    if not drawn or not hasattr(student, "window_options"):
        return _one_student_cost(distiller, resolution, device, mixed_precision, active)
    patch = student.patch_size
    options = student.window_options(resolution[0] // patch, resolution[1] // patch)
    try:
        student.window_sizes = [None if None in options else max(options)]
        return _one_student_cost(distiller, resolution, device, mixed_precision, active)
    finally:
        student.window_sizes = drawn


def _one_student_cost(distiller, resolution: tuple[int, int], device: str = "meta",
                      mixed_precision: str = "no", active: Optional[list[str]] = None) -> ModelCost:
    """FLOPs of one image's forward + backward through student and heads, and the bytes kept
    for backward as a GPU run stores them (``radio_core.activations``): per image (the growth
    from batch 1 to 2) plus, under activation checkpointing, one block's recomputed activations
    (the peak of the backward pass). Weight copies autocast makes are per step, not per image:
    they are counted in ``ModelCost.fixed_activation_bytes``. ``active``: the teachers whose heads
    run over every token (the group's; the others only touch their parameters)."""
    dtype = MIXED_DTYPES.get(mixed_precision)

    def flop_step():
        x = torch.rand(1, 3, *resolution, device=device)
        out, preds = distiller(x, return_predictions=True, active=active)
        loss = sum(p.float().sum() for pair in preds.values() for p in pair if p is not None)
        loss.backward()

    def kept(batch: int) -> float:
        x = torch.rand(batch, 3, *resolution, device=device)
        return saved_bytes(lambda: distiller(x, return_predictions=True, active=active), dtype, distiller)

    distiller.train()
    flops = count_flops(flop_step)
    x1 = torch.rand(1, 3, *resolution, device=device)  # (with grad: FlopCounterMode's module hooks want it)
    forward = count_flops(lambda: distiller(x1, return_predictions=True, active=active))
    one, two = kept(1), kept(2)
    per_image, fixed = two - one, 2 * one - two
    student = distiller.student
    blocks = len(getattr(student, "blocks", ()))
    if getattr(student, "grad_checkpointing", False) and blocks:
        student.grad_checkpointing = False
        try:
            full = kept(2) - kept(1)
        finally:
            student.grad_checkpointing = True
        per_image += max(full - per_image, 0.0) / blocks  # one block recomputed at a time
    params = sum(p.numel() for p in distiller.parameters())
    return ModelCost(params, flops, per_image, max(fixed, 0.0), forward)


@torch.no_grad()
def teacher_cost(teacher) -> ModelCost:
    device = next(teacher.parameters()).device
    x = torch.rand(1, 3, *teacher.input_size, device=device)
    return ModelCost(sum(p.numel() for p in teacher.parameters()), count_flops(lambda: teacher(x)))


def plan(recipe: Recipe, registry: Registry, world_size: int) -> tuple[list[GroupPlan], str, object]:
    """Per stage and group: parameters, FLOPs per image, memory per rank; also the layout text
    and the (meta) student, whose settings the fitting advice reads."""
    plans = plan_stages(recipe, world_size)
    teacher_bytes = 2 if recipe.train.mixed_precision in ("bf16", "fp16") else 4
    teachers = {}
    dims = {}
    for name in recipe.teachers:
        if any(name in p.teachers for p in plans):
            teachers[name] = build_teacher(recipe, name, registry, meta=True)
            dims[name] = (teachers[name].summary_dim, teachers[name].spatial_dim)
    with torch.device("meta"):
        distiller = build_distiller(recipe, dims, registry)
    costs: dict[tuple, ModelCost] = {(n, None, False): teacher_cost(t) for n, t in teachers.items()}

    def cost(name: str, slot) -> ModelCost:
        """A teacher's cost as the slot runs it: at its resolution there (a group override or its
        own), upsampled by FeatSharp or not (the tiles' forwards and the upsampler included)."""
        key = slot.teacher_key(name)
        if key not in costs:
            costs[key] = teacher_cost(build_teacher(recipe, name, registry, meta=True, resolution=key[1],
                                                    upsampled=key[2]))
        return costs[key]
    fsdp = recipe.train.fsdp.enabled and world_size > 1
    gathered = fsdp_gathered_params(distiller, recipe.train.fsdp) if fsdp else 0
    rows: list[GroupPlan] = []
    student_cache: dict[tuple, ModelCost] = {}
    regularizer_bytes = regularizer_weight_bytes(recipe, distiller)
    for p in plans:
        groups: dict[str, tuple[int, object]] = {}
        for slots in p.rank_slots:
            for s in slots:
                n, _ = groups.get(s.group, (0, s))
                groups[s.group] = (n + 1, s)
        for gname, (nranks, slot) in groups.items():
            def cost_at(r, slot=slot) -> ModelCost:
                key = (r, tuple(slot.teachers))
                if key not in student_cache:
                    student_cache[key] = student_cost(distiller, r, mixed_precision=recipe.train.mixed_precision,
                                                      active=list(slot.teachers))
                return student_cache[key]

            res = max(slot.student_resolution, key=lambda r: r[0] * r[1])  # worst case for memory
            sc = cost_at(res)
            row = GroupPlan(p.name, gname, nranks, slot.batch_size, res, sc,
                            {t: cost(t, slot) for t in slot.teachers}, forwards=slot.forwards, mosaic=slot.mosaic,
                            mesa=recipe.train.mesa is not None, regularizer_bytes=regularizer_bytes,
                            upsampled={t: recipe.teachers[t].upsampler.factor for t in slot.upsample})
            if len(slot.student_resolution) > 1:
                row.student_by_resolution = [cost_at(r) for r in slot.student_resolution]
            student_bytes = sc.params * 4
            row.optimizer_bytes = sc.params * (4 + 8)  # fp32 gradients + AdamW exp_avg, exp_avg_sq
            if fsdp:  # each rank holds 1/world of all of it, plus the units gathered at a time
                student_bytes = sc.params * 4 / world_size + gathered * teacher_bytes
                row.optimizer_bytes = 0.0 if recipe.train.fsdp.cpu_offload else row.optimizer_bytes / world_size
            row.weight_bytes = (student_bytes + sum(c.params for c in row.teachers.values()) * teacher_bytes
                                + regularizer_bytes)
            row.activation_bytes = sc.activation_bytes_per_image * row.inputs + sc.fixed_activation_bytes
            rows.append(row)
    return rows, describe(plans, recipe.train.grad_accum), distiller.student


def regularizer_weight_bytes(recipe: Recipe, distiller) -> float:
    """fp32 copies the robustness regularisers keep: MESA's EMA of student + heads, DAMP's clean
    copy of the student's Linear weights during a micro-step."""
    total = 0.0
    if recipe.train.mesa is not None:
        total += sum(p.numel() for p in distiller.parameters()) * 4
    if recipe.train.damp is not None:
        total += sum(p.numel() for p in linear_weights(distiller.student)) * 4
    return total


def fsdp_gathered_params(model: torch.nn.Module, spec) -> int:
    """Parameters one rank holds unsharded at a time under FSDP: the root unit's own (not in a
    wrapped unit; gathered for the whole forward) plus two of the largest unit (the one running
    and the one prefetched)."""
    total = sum(p.numel() for p in model.parameters())
    sizes, seen = [], set()
    # Bottom-up like the auto-wrap policies: a module becomes a unit of the parameters not yet in
    # a unit below it (by class name, or once those reach min_num_params).
    for m in reversed(list(model.modules())):
        if m is model:
            continue
        own = [p for p in m.parameters() if id(p) not in seen]
        n = sum(p.numel() for p in own)
        if n and (type(m).__name__ in spec.wrap if spec.wrap else n >= spec.min_num_params):
            sizes.append(n)
            seen |= {id(p) for p in own}
    return total - sum(sizes) + 2 * max(sizes, default=0)


#: share of the device kept free for the CUDA context, communication buffers, teacher
#: activations (freed layer by layer under no_grad) and allocator fragmentation.
RESERVE = 0.10


def default_gpu_memory() -> float:
    """GiB of the first visible GPU, else 80 (the paper's A100-80GB)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GiB
    return 80.0


def levers(row: GroupPlan, budget: float, student, recipe: Recipe) -> list[str]:
    """What would make ``row`` fit in ``budget`` bytes, most direct first."""
    out = []
    per_image = row.student.activation_bytes_per_image
    room = budget - row.weight_bytes - row.optimizer_bytes - row.student.fixed_activation_bytes
    per_input = row.batch_size // row.inputs  # images per canvas under a mosaic, else 1
    fits = int(room // per_image) * per_input if per_image > 0 else row.batch_size
    if 0 < fits < row.batch_size:
        accum = -(-row.batch_size // fits)
        out.append(f"batch {fits}/rank fits: set groups.{row.group}.batch_size (or the stage's) to {fits} and "
                   f"train.grad_accum to {accum} to keep the effective batch")
    elif fits <= 0:
        out.append("not even one image fits beside weights and optimiser states: shard them (FSDP) or use a "
                   "smaller student")
    if getattr(student, "grad_checkpointing", True) is False:
        out.append("student.args.grad_checkpointing: true (keeps one block's activations instead of all)")
    if recipe.train.mixed_precision == "no":
        out.append("train.mixed_precision: bf16 (halves what matmuls keep)")
    if hasattr(student, "window_sizes") and not student.window_sizes and max(row.student_resolution) >= 768:
        out.append("student.args.window_sizes: [16] (ViTDet windowed attention at high resolution)")
    return out


def format_plan(rows: list[GroupPlan], layout: str, world_size: int, recipe: Recipe,
                gpu_memory: float = 80.0, student=None) -> str:
    budget = gpu_memory * (1 - RESERVE) * GiB
    lines = [f"dry run: world size {world_size}, mixed precision {recipe.train.mixed_precision}, "
             f"{recipe.train.steps} steps, {gpu_memory:.4g} GiB per GPU (budget {budget / GiB:.4g} GiB)",
             layout, ""]
    head = (f"{'stage':<10} {'group':<10} {'ranks':>5} {'batch':>5} {'student':>9} {'params M':>9} "
            f"{'GFLOP/img':>10} {'TFLOP/rank-step':>15} {'weights':>8} {'grad+opt':>8} {'activ.':>8} {'total GiB':>9}"
            f" {'fits':>4}")
    lines.append(head)
    lines.append("-" * len(head))
    warnings = []
    for r in rows:
        params = r.student.params + sum(t.params for t in r.teachers.values())
        gflop = r.per_input_flops(r.student) / 1e9
        fits = r.total_bytes <= budget
        lines.append(f"{r.stage:<10} {r.group:<10} {r.ranks:>5} {r.batch_size:>5} "
                     f"{r.student_resolution[0]:>4}x{r.student_resolution[1]:<4} {params / 1e6:>9.4g} {gflop:>10.4g} "
                     f"{r.flops_per_rank_step / 1e12:>15.4g} {r.weight_bytes / GiB:>8.3g} "
                     f"{r.optimizer_bytes / GiB:>8.3g} {r.activation_bytes / GiB:>8.3g} {r.total_bytes / GiB:>9.3g}"
                     f" {'yes' if fits else 'NO':>4}")
        lines.append(f"{'':<10} {'':<10} student+heads {r.student.params / 1e6:.4g}M params, "
                     f"{r.student.flops_per_image / 1e9:.4g} GFLOP/img fwd+bwd, "
                     f"activations {r.student.activation_bytes_per_image / 2**20:.4g} MiB/img "
                     f"+ {r.student.fixed_activation_bytes / 2**20:.4g} MiB/step")
        for name, t in r.teachers.items():
            u = r.upsampled.get(name)
            how = (f" (FeatSharp {u}x: the teacher on the image and on its {u * u} tiles, then the upsampler)"
                   if u else "")
            lines.append(f"{'':<10} {'':<10} teacher {name}: {t.params / 1e6:.4g}M params, "
                         f"{t.flops_per_image / 1e9:.4g} GFLOP/img fwd{how}")
        if r.mesa or r.regularizer_bytes:
            mesa = (f"MESA EMA forward {r.student.forward_flops_per_image / 1e9:.4g} GFLOP/img; " if r.mesa else "")
            lines.append(f"{'':<10} {'':<10} regularisers: {mesa}weight copies {r.regularizer_bytes / GiB:.3g} GiB "
                         f"(in weights)")
        if r.mosaic:
            lines.append(f"{'':<10} {'':<10} mosaic {r.mosaic}x{r.mosaic}: {r.batch_size} images in {r.inputs} "
                         f"canvas(es) per rank-step (FLOPs and activations per canvas)")
        if not fits:
            fix = levers(r, budget, student, recipe) if student is not None else []
            warnings.append(f"WARNING: stage {r.stage}, group {r.group}: {r.total_bytes / GiB:.3g} GiB per rank does "
                            f"not fit the {budget / GiB:.3g} GiB budget of a {gpu_memory:.4g} GiB GPU. Levers: "
                            + ("; ".join(fix) if fix else "a smaller batch or student"))
    lines += [""] + throughput_lines(rows)
    lines.append("")
    f = recipe.train.fsdp
    if f.enabled and world_size > 1:
        lines.append(f"FSDP: student + heads sharded over all {world_size} ranks (weights: 1/{world_size} of the "
                     f"fp32 student plus the units gathered at a time; grad+opt: 1/{world_size}"
                     f"{', offloaded to host memory' if f.cpu_offload else ''}); teachers replicated per group.")
    lines.append(f"Activations are counted as a GPU keeps them: {recipe.train.mixed_precision} autocast, fused "
                 f"attention, activation checkpointing as configured. The budget keeps {RESERVE:.0%} of the GPU for "
                 f"the CUDA context, communication buffers, teacher activations and fragmentation.")
    lines.extend(warnings)
    return "\n".join(lines)


def throughput_lines(rows: list[GroupPlan]) -> list[str]:
    """Throughput cost of each stage's schedule. Steps are synchronous, so the slowest rank sets
    the pace; every group draws its student resolution from the same per-step number (index mod
    its set size), so the expected step cost is the mean over draws of the costliest group."""
    out = ["throughput (forward+backward FLOPs; a step lasts as long as its costliest rank):"]
    for stage in dict.fromkeys(r.stage for r in rows):
        group_rows = [r for r in rows if r.stage == stage]
        sizes = [len(r.student_by_resolution) or 1 for r in group_rows]
        draws = math.lcm(*sizes)
        step = sum(max(r.step_flops(i) for r in group_rows) for i in range(draws)) / draws
        worst = max(r.flops_per_rank_step for r in group_rows)
        ranks = sum(r.ranks for r in group_rows)
        mean_rank = sum(r.expected_flops_per_rank_step * r.ranks for r in group_rows) / ranks
        images = sum(r.batch_size * r.ranks for r in group_rows)
        out.append(f"  {stage}: expected step {step / 1e12:.4g} TFLOP on the slowest rank (worst draw "
                   f"{worst / 1e12:.4g}), mean rank {mean_rank / 1e12:.4g} -> ranks busy {100 * mean_rank / step:.0f}% "
                   f"of the step; {images} images/step, {step * ranks / images / 1e9:.4g} GFLOP of rank time per image")
        for r in group_rows:
            if r.student_by_resolution:
                flops = [c.flops_per_image / 1e9 for c in r.student_by_resolution]
                out.append(f"    group {r.group}: student drawn from {len(flops)} resolutions, "
                           f"{min(flops):.4g}-{max(flops):.4g} GFLOP/img (mean {sum(flops) / len(flops):.4g}); "
                           f"expected {r.expected_flops_per_rank_step / 1e12:.4g} TFLOP/rank-step vs "
                           f"{r.flops_per_rank_step / 1e12:.4g} at its largest")
    return out


def dry_run(recipe: Recipe, registry: Registry, world_size: int, gpu_memory: Optional[float] = None) -> str:
    rows, layout, student = plan(recipe, registry, world_size)
    return format_plan(rows, layout, world_size, recipe, gpu_memory or default_gpu_memory(), student)
