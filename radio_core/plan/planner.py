"""Dry-run planner: size a run before renting the cluster.

Builds every model on the meta device (no weights, no memory, no download), counts FLOPs per
image with ``torch.utils.flop_counter.FlopCounterMode`` (student forward + backward, each
teacher's forward), and estimates per-rank memory (weights, gradients + AdamW states,
activations saved for backward), per stage and group, for a given world size.

    python -m radio_core.run RECIPE --dry-run --world-size 64
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..models.distiller import build_distiller
from ..models.teachers import build_teacher
from ..recipe import Recipe
from ..registry import Registry
from .partition import describe, plan_stages

GiB = 1024**3


@dataclass
class ModelCost:
    params: int
    flops_per_image: float  # forward (teachers) or forward + backward (student)
    activation_bytes_per_image: float = 0.0


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

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def flops_per_rank_step(self) -> float:
        """At the group's largest student resolution (the worst case)."""
        per_image = self.student.flops_per_image + sum(t.flops_per_image for t in self.teachers.values())
        return per_image * self.batch_size

    def step_flops(self, choice: int) -> float:
        """Per-rank FLOPs of a step whose resolution draw is ``choice`` (index mod set size)."""
        costs = self.student_by_resolution or [self.student]
        per_image = costs[choice % len(costs)].flops_per_image + sum(t.flops_per_image for t in self.teachers.values())
        return per_image * self.batch_size

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


def student_cost(distiller, resolution: tuple[int, int], device: str = "meta") -> ModelCost:
    """FLOPs of one image's forward + backward through student and heads, and the bytes of
    activations saved for backward."""
    x = torch.rand(1, 3, *resolution, device=device)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, preds = distiller(x, return_predictions=True)
            loss = sum(p.float().sum() for pair in preds.values() for p in pair if p is not None)
        loss.backward()

    distiller.train()
    flops = count_flops(step)
    params = sum(p.numel() for p in distiller.parameters())
    return ModelCost(params, flops, float(saved[0]))


@torch.no_grad()
def teacher_cost(teacher) -> ModelCost:
    device = next(teacher.parameters()).device
    x = torch.rand(1, 3, *teacher.input_size, device=device)
    return ModelCost(sum(p.numel() for p in teacher.parameters()), count_flops(lambda: teacher(x)))


def plan(recipe: Recipe, registry: Registry, world_size: int) -> tuple[list[GroupPlan], str]:
    """Per stage and group: parameters, FLOPs per image, memory per rank."""
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
    costs: dict[tuple, ModelCost] = {(n, None): teacher_cost(t) for n, t in teachers.items()}

    def cost(name: str, slot) -> ModelCost:
        """A teacher's cost at the slot's resolution for it (a group override or its own)."""
        key = (name, slot.teacher_resolution.get(name))
        if key not in costs:
            costs[key] = teacher_cost(build_teacher(recipe, name, registry, meta=True, resolution=key[1]))
        return costs[key]
    fsdp = recipe.train.fsdp.enabled and world_size > 1
    gathered = fsdp_gathered_params(distiller, recipe.train.fsdp) if fsdp else 0
    rows: list[GroupPlan] = []
    student_cache: dict[tuple, ModelCost] = {}
    for p in plans:
        groups: dict[str, tuple[int, object]] = {}
        for slots in p.rank_slots:
            for s in slots:
                n, _ = groups.get(s.group, (0, s))
                groups[s.group] = (n + 1, s)
        for gname, (nranks, slot) in groups.items():
            for r in slot.student_resolution:
                if r not in student_cache:
                    student_cache[r] = student_cost(distiller, r)
            res = max(slot.student_resolution, key=lambda r: r[0] * r[1])  # worst case for memory
            sc = student_cache[res]
            row = GroupPlan(p.name, gname, nranks, slot.batch_size, res, sc,
                            {t: cost(t, slot) for t in slot.teachers})
            if len(slot.student_resolution) > 1:
                row.student_by_resolution = [student_cache[r] for r in slot.student_resolution]
            student_bytes = sc.params * 4
            row.optimizer_bytes = sc.params * (4 + 8)  # fp32 gradients + AdamW exp_avg, exp_avg_sq
            if fsdp:  # each rank holds 1/world of all of it, plus the units gathered at a time
                student_bytes = sc.params * 4 / world_size + gathered * teacher_bytes
                row.optimizer_bytes = 0.0 if recipe.train.fsdp.cpu_offload else row.optimizer_bytes / world_size
            row.weight_bytes = student_bytes + sum(c.params for c in row.teachers.values()) * teacher_bytes
            act_scale = 0.5 if recipe.train.mixed_precision in ("bf16", "fp16") else 1.0
            row.activation_bytes = sc.activation_bytes_per_image * slot.batch_size * act_scale
            rows.append(row)
    return rows, describe(plans, recipe.train.grad_accum)


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


def format_plan(rows: list[GroupPlan], layout: str, world_size: int, recipe: Recipe) -> str:
    lines = [f"dry run: world size {world_size}, mixed precision {recipe.train.mixed_precision}, "
             f"{recipe.train.steps} steps", layout, ""]
    head = (f"{'stage':<10} {'group':<10} {'ranks':>5} {'batch':>5} {'student':>9} {'params M':>9} "
            f"{'GFLOP/img':>10} {'TFLOP/rank-step':>15} {'weights':>8} {'grad+opt':>8} {'activ.':>8} {'total GiB':>9}")
    lines.append(head)
    lines.append("-" * len(head))
    for r in rows:
        params = r.student.params + sum(t.params for t in r.teachers.values())
        gflop = (r.student.flops_per_image + sum(t.flops_per_image for t in r.teachers.values())) / 1e9
        lines.append(f"{r.stage:<10} {r.group:<10} {r.ranks:>5} {r.batch_size:>5} "
                     f"{r.student_resolution[0]:>4}x{r.student_resolution[1]:<4} {params / 1e6:>9.4g} {gflop:>10.4g} "
                     f"{r.flops_per_rank_step / 1e12:>15.4g} {r.weight_bytes / GiB:>8.3g} "
                     f"{r.optimizer_bytes / GiB:>8.3g} {r.activation_bytes / GiB:>8.3g} {r.total_bytes / GiB:>9.3g}")
        lines.append(f"{'':<10} {'':<10} student+heads {r.student.params / 1e6:.4g}M params, "
                     f"{r.student.flops_per_image / 1e9:.4g} GFLOP/img fwd+bwd, "
                     f"activations {r.student.activation_bytes_per_image / 2**20:.4g} MiB/img (fp32)")
        for name, t in r.teachers.items():
            lines.append(f"{'':<10} {'':<10} teacher {name}: {t.params / 1e6:.4g}M params, "
                         f"{t.flops_per_image / 1e9:.4g} GFLOP/img fwd")
    lines += [""] + throughput_lines(rows)
    lines.append("")
    f = recipe.train.fsdp
    if f.enabled and world_size > 1:
        lines.append(f"FSDP: student + heads sharded over all {world_size} ranks (weights: 1/{world_size} of the "
                     f"fp32 student plus the units gathered at a time; grad+opt: 1/{world_size}"
                     f"{', offloaded to host memory' if f.cpu_offload else ''}); teachers replicated per group.")
    lines.append("Memory excludes teacher activations (freed layer by layer under no_grad), the CUDA "
                 "context and allocator fragmentation: keep ~20% headroom.")
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


def dry_run(recipe: Recipe, registry: Registry, world_size: int) -> str:
    rows, layout = plan(recipe, registry, world_size)
    return format_plan(rows, layout, world_size, recipe)


