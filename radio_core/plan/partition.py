"""Stages, teacher groups and their assignment to ranks.

A *group* is a set of teachers that run together with one per-rank batch size and student
resolution; each group gets a share of the ranks (AM-RADIO: half the GPUs run CLIP + DINOv2 at
432px with batch 32, half run SAM at 1024px with batch 2). With fewer ranks than groups, a rank
runs several groups, one after the other within the step.

Loss weighting across ranks: DDP averages gradients over all N ranks, so a teacher that runs on
n of them would silently get weight n/N. The trainer multiplies each teacher's loss by N / n
(``teacher_scale``): every teacher's term is then its mean over the batches that ran it, and the
objective is the recipe's weighted sum of per-teacher mean losses whatever the partition.
Ranks without a teacher still touch its heads with a zero-weighted term, so DDP sees every
parameter used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..recipe import GroupSpec, Recipe, RecipeError


@dataclass
class Slot:
    """One (rank, group) pair: the batch a rank draws for one group each micro-step."""

    group: str
    teachers: list[str]
    batch_size: int
    student_resolution: list[tuple[int, int]]
    #: position of this slot's samples in the global per-micro-step numbering.
    offset: int = 0
    #: teacher -> input resolution on this slot, where the group overrides the teacher's own.
    teacher_resolution: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: mosaic augmentation: k x k images per canvas (``groups.NAME.mosaic``), or None.
    mosaic: Optional[int] = None
    #: teachers whose spatial target this slot upsamples with their ``upsampler`` (FeatSharp).
    upsample: tuple[str, ...] = ()

    def teacher_key(self, name: str) -> tuple:
        """(teacher, resolution override or None, upsampled): which instance of a teacher runs here."""
        return (name, self.teacher_resolution.get(name), name in self.upsample)

    @property
    def forwards(self) -> int:
        """Inputs the student and teachers run on per micro-step (canvases under a mosaic)."""
        return self.batch_size // (self.mosaic or 1) ** 2


@dataclass
class StagePlan:
    index: int
    name: str
    start_step: int
    steps: int
    teachers: list[str]
    #: rank -> the slots that rank runs.
    rank_slots: list[list[Slot]]
    #: samples drawn per micro-step over all ranks.
    consumption: int
    #: global sample number of this stage's first sample.
    number_base: int
    #: teacher -> how many slots (batches) run it per micro-step, over all ranks.
    teacher_slots: dict[str, int] = field(default_factory=dict)
    restart_schedule: bool = False

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    def teacher_scale(self, world_size: int) -> dict[str, float]:
        return {t: world_size / n for t, n in self.teacher_slots.items()}


def assign_ranks(groups: dict[str, GroupSpec], world_size: int, where: str = "groups") -> list[list[str]]:
    """rank -> group names. Shares (or exact counts) when there are enough ranks; otherwise
    groups are dealt round-robin so that every group still runs."""
    names = list(groups)
    if world_size < len(names):
        return [[n for i, n in enumerate(names) if i % world_size == r] for r in range(world_size)]
    counts: dict[str, int] = {}
    fixed = {n: g.ranks for n, g in groups.items() if g.ranks is not None}
    free = world_size - sum(fixed.values())
    flexible = [n for n in names if n not in fixed]
    if free < len(flexible) or (not flexible and free != 0):
        raise RecipeError(f"{where}: impossible rank partition: groups ask for {sum(fixed.values())} fixed "
                          f"rank(s) plus {len(flexible)} group(s) by share, with {world_size} rank(s) in all")
    counts.update(fixed)
    if flexible:
        shares = [groups[n].share if groups[n].share is not None else 1.0 / len(flexible) for n in flexible]
        total = sum(shares)
        raw = [free * s / total for s in shares]
        alloc = [max(1, int(x)) for x in raw]
        # Largest remainders get the ranks left over (or give back the excess).
        order = sorted(range(len(flexible)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
        i = 0
        while sum(alloc) < free:
            alloc[order[i % len(order)]] += 1
            i += 1
        while sum(alloc) > free:
            j = max(range(len(alloc)), key=lambda k: alloc[k] - raw[k])
            if alloc[j] <= 1:
                raise RecipeError(f"{where}: impossible rank partition: {len(flexible)} groups for {free} rank(s)")
            alloc[j] -= 1
        counts.update(zip(flexible, alloc))
    ranks: list[list[str]] = []
    for n in names:
        ranks += [[n]] * counts[n]
    return ranks


def plan_stages(recipe: Recipe, world_size: int) -> list[StagePlan]:
    """Resolve stages, groups and rank assignment for ``world_size`` processes."""
    stages = recipe.stages or [None]
    plans: list[StagePlan] = []
    start = number = 0
    for i, st in enumerate(stages):
        teachers = (st.teachers if st and st.teachers is not None else list(recipe.teachers))
        steps = st.steps if st else recipe.train.steps
        student_res = recipe.resolutions(st.student_resolution if st and st.student_resolution
                                         else recipe.student.resolution)
        groups = (st.groups if st and st.groups else recipe.groups) or {
            "all": GroupSpec(teachers=teachers)}
        # Keep only this stage's teachers; drop groups left empty.
        groups = {n: g.model_copy(update={"teachers": [t for t in g.teachers if t in teachers]})
                  for n, g in groups.items()}
        groups = {n: g for n, g in groups.items() if g.teachers}
        where = f"stages.{i}.groups" if st and st.groups else "groups"
        per_rank = assign_ranks(groups, world_size, where)
        rank_slots: list[list[Slot]] = []
        offset = 0
        teacher_slots: dict[str, int] = {}
        for r in range(world_size):
            slots = []
            for gname in per_rank[r]:
                g = groups[gname]
                slot = Slot(gname, list(g.teachers), g.batch_size or recipe.data.batch_size,
                            [tuple(x) for x in (recipe.resolutions(g.student_resolution) or student_res)], offset,
                            {t: tuple(res) for t, res in g.teacher_resolution.items() if t in g.teachers},
                            g.mosaic, upsampled_here(recipe, gname, g.teachers))
                offset += slot.batch_size
                slots.append(slot)
                for t in g.teachers:
                    teacher_slots[t] = teacher_slots.get(t, 0) + 1
            rank_slots.append(slots)
        name = (st.name if st and st.name else f"stage{i}") if st else "main"
        plans.append(StagePlan(i, name, start, steps, teachers, rank_slots, offset, number, teacher_slots,
                               bool(st and st.restart_schedule)))
        start += steps
        number += steps * recipe.train.grad_accum * offset
    return plans


def upsampled_here(recipe: Recipe, group: str, teachers: list[str]) -> tuple[str, ...]:
    """The teachers of ``group`` whose ``upsampler`` runs on it (its ``groups``, or all)."""
    out = []
    for t in teachers:
        up = recipe.teachers[t].upsampler
        if up is not None and (up.groups is None or group in up.groups):
            out.append(t)
    return tuple(out)


def stage_at(plans: list[StagePlan], step: int) -> Optional[StagePlan]:
    for p in plans:
        if p.start_step <= step < p.end_step:
            return p
    return None


def describe(plans: list[StagePlan], grad_accum: int = 1) -> str:
    lines = []
    for p in plans:
        eff = p.consumption * grad_accum
        lines.append(f"stage {p.index} ({p.name}): steps {p.start_step}-{p.end_step}, teachers "
                     f"{', '.join(p.teachers)}, effective batch {eff}")
        by_group: dict[str, list[int]] = {}
        for r, slots in enumerate(p.rank_slots):
            for s in slots:
                by_group.setdefault(s.group, []).append(r)
        for gname, ranks in by_group.items():
            s = next(s for slots in p.rank_slots for s in slots if s.group == gname)
            res = ", ".join(f"{h}x{w}" for h, w in s.student_resolution)
            teachers = ", ".join(_teacher_label(s, t) for t in s.teachers)
            mosaic = f" in {s.forwards} mosaic(s) of {s.mosaic}x{s.mosaic}" if s.mosaic else ""
            lines.append(f"  group {gname}: {len(ranks)} rank(s) {_ranges(ranks)}, teachers {teachers}, "
                         f"batch {s.batch_size}/rank{mosaic}, student {res}")
    return "\n".join(lines)


def _teacher_label(slot: Slot, name: str) -> str:
    res = slot.teacher_resolution.get(name)
    label = name if res is None else f"{name}@{res[0]}x{res[1]}"
    return f"{label}+featsharp" if name in slot.upsample else label


def _ranges(ranks: list[int]) -> str:
    if not ranks:
        return "[]"
    out, start, prev = [], ranks[0], ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return "[" + ", ".join(out) + "]"
