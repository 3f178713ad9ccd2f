"""The distillation training loop (Accelerate).

One optimiser step:
  batch (uint8 crops) -> per teacher group: resize once -> per teacher: normalise -> frozen
  forward -> targets; student input: resize -> student + adaptor heads -> per-teacher losses
  (grids matched to the larger one) -> weighted sum -> backward -> clip -> AdamW -> LR schedule.

Exact resume: model, optimiser and scheduler state come from ``accelerator.save_state``; the
data position is the step number (sampling is a pure function of seed and sample number, see
``radio_core.data``); all other randomness (student CPE crops, window sizes, multi-resolution
choice) is reseeded from (seed, step, slot) before each forward.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from . import preprocess
from .cache import CacheMismatchError, FeatureCache, compute_targets, run_identity
from .data import AugmentedImages, StepBatchSampler, _mix, collate, loader_worker_init, sampling_kwargs
from .distiller import Distiller, HeadSpec
from .losses import match_grids
from .protocols import Teacher, TeacherOutput
from .recipe import Recipe, dump_recipe
from .registry import PluginError, Registry, get_registry
from .partition import Slot, StagePlan, describe, plan_stages, stage_at
from .schedule import build_scheduler, lr_multiplier
from .validate import check_student_resolutions

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TeacherGroup:
    """Teachers that share an input size and resize mode: their input is resized once."""

    input_size: tuple[int, int]
    resize_mode: str
    names: list[str] = field(default_factory=list)


def group_teachers(teachers: dict[str, Teacher]) -> list[TeacherGroup]:
    groups: dict[tuple, TeacherGroup] = {}
    for name, t in teachers.items():
        key = (tuple(t.input_size), t.resize_mode)
        groups.setdefault(key, TeacherGroup(tuple(t.input_size), t.resize_mode)).names.append(name)
    return list(groups.values())


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs (saved as JSON in the checkpoint)."""

    step: int = 0  # optimiser steps completed
    samples_seen: int = 0  # global, all ranks
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    bad_images: int = 0  # over all ranks
    #: global number of the next sample to draw (lets a run resume on another world size).
    next_number: int = 0
    world_size: int = 1

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if hasattr(self, k):
                setattr(self, k, v)


def build_teacher(recipe: Recipe, name: str, registry: Registry, meta: bool = False) -> Teacher:
    """Build (and freeze) one teacher; ``meta=True`` builds its architecture without weights,
    only to learn its dimensions (plugins that don't support it are built for real)."""
    spec = recipe.teachers[name]
    kwargs: dict[str, Any] = dict(spec.args, resolution=tuple(spec.resolution) if spec.resolution else None)
    if meta and accepts_kwarg(registry.get("teacher", spec.plugin).factory, "meta"):
        kwargs["meta"] = True
    try:
        teacher = registry.build("teacher", spec.plugin, **kwargs)
    except PluginError as exc:
        raise PluginError(f"teachers.{name}: {exc}") from None
    if not isinstance(teacher, Teacher):
        raise PluginError(f"teachers.{name}: plugin {spec.plugin!r} returned {type(teacher).__name__}, "
                          "not a radio_core.Teacher")
    return teacher.freeze()


def check_teacher_output(name: str, plugin: str, teacher: Teacher, out: Any, batch: int) -> None:
    """Shape checks only (no host sync): a plugin that breaks the protocol is named."""
    where = f"teachers.{name} (plugin {plugin!r})"
    if not isinstance(out, TeacherOutput):
        raise PluginError(f"{where}: forward returned {type(out).__name__}, not a TeacherOutput")
    sp = out.spatial
    if sp.dim() != 4 or sp.shape[0] != batch or sp.shape[1] != teacher.spatial_dim:
        raise PluginError(f"{where}: spatial output has shape {tuple(sp.shape)}; expected "
                          f"({batch}, spatial_dim={teacher.spatial_dim}, h, w)")
    if teacher.summary_dim is None:
        return
    sm = out.summary
    if sm is None or tuple(sm.shape) != (batch, teacher.summary_dim):
        got = None if sm is None else tuple(sm.shape)
        raise PluginError(f"{where}: summary output has shape {got}; expected ({batch}, {teacher.summary_dim})")


def accepts_kwarg(fn: Any, name: str) -> bool:
    """Whether ``fn`` names the parameter explicitly (a ``**kwargs`` catch-all does not count)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def build_distiller(recipe: Recipe, dims: dict[str, tuple[Optional[int], int]], registry: Registry) -> Distiller:
    """Student + heads for every teacher of every stage (``dims``: name -> (summary, spatial))."""
    heads = [HeadSpec(name,
                      summary if recipe.teachers[name].use_summary else None,
                      spatial if recipe.teachers[name].use_spatial else None)
             for name, (summary, spatial) in dims.items()]
    num_cls = max(1, sum(h.summary_dim is not None for h in heads))
    try:
        student = registry.build("student", recipe.student.name, **recipe.student.args, num_cls_tokens=num_cls)
    except PluginError as exc:
        raise PluginError(f"student: {exc}") from None
    hidden = max(d for h in heads for d in (h.summary_dim, h.spatial_dim) if d is not None)
    summary_heads, spatial_heads = {}, {}
    for h in heads:
        spec = recipe.teachers[h.name].adaptor or recipe.adaptor
        for dim, table in ((h.summary_dim, summary_heads), (h.spatial_dim, spatial_heads)):
            if dim is not None:
                table[h.name] = registry.build("adaptor", spec.name, in_dim=student.embed_dim, out_dim=dim,
                                               hidden_dim=hidden, **spec.args)
    norms = {}
    for h in heads:
        kind = recipe.teachers[h.name].target_norm
        if kind == "none":
            continue
        from .normalize import build_target_norm

        parts = {part: build_target_norm(kind, dim) for part, dim in (("summary", h.summary_dim),
                                                                        ("spatial", h.spatial_dim)) if dim}
        norms[h.name] = torch.nn.ModuleDict(parts)
    return Distiller(student, heads, summary_heads, spatial_heads, norms)


@dataclass
class SlotRuntime:
    """What a rank needs to run one slot: its teachers grouped by input size, and its data."""

    slot: Slot
    resize_sets: list[TeacherGroup]
    dataset: AugmentedImages
    iterator: Any = None


class Trainer:
    def __init__(self, recipe: Recipe, registry: Optional[Registry] = None, resume: bool = False,
                 accelerator: Any = None, recipe_path: str = "<recipe>") -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.recipe, self.recipe_path = recipe, recipe_path
        self.registry = registry or get_registry()
        self.accelerator = accelerator or Accelerator(
            # Without this, torchrun on a machine with no GPU silently gives N single processes.
            cpu=not torch.cuda.is_available(),
            mixed_precision=recipe.train.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        self.out_dir = Path(recipe.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.state = TrainerState()
        self._stop_requested = False
        self._resume = resume
        self.teachers: dict[str, Teacher] = {}
        self.stage: Optional[StagePlan] = None
        self._number_shift = 0  # added to sample numbers when resuming on another world size
        self._bad_base, self._bad_local = 0, 0
        self._build()

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        r, acc = self.recipe, self.accelerator
        self.plans = plan_stages(r, acc.num_processes)
        torch.manual_seed(r.train.seed)
        all_teachers = [t for t in r.teachers if any(t in p.teachers for p in self.plans)]
        mine = {t for p in self.plans for slot in p.rank_slots[acc.process_index] for t in slot.teachers}
        dims: dict[str, tuple[Optional[int], int]] = {}
        self.cache, self.cached = self._open_cache(all_teachers)
        for name in all_teachers:
            if name in self.cached:
                dims[name] = self.cache.dims(name)
                continue
            if name in mine:
                self.teachers[name] = build_teacher(r, name, self.registry).to(acc.device, self.teacher_dtype())
                t = self.teachers[name]
            else:  # another rank runs it; this rank only needs its dimensions for the heads
                t = build_teacher(r, name, self.registry, meta=True)
            dims[name] = (t.summary_dim, t.spatial_dim)
        torch.manual_seed(r.train.seed)  # same student/head init on every rank, whatever was built
        distiller = build_distiller(r, dims, self.registry)
        check_student_resolutions(self.plans, distiller.student.size_multiple, r.student.name, self.recipe_path)
        self.summary_losses = {n: self.registry.build("loss", s.summary_loss.name, **s.summary_loss.args)
                               for n, s in r.teachers.items()}
        self.spatial_losses = {n: self.registry.build("loss", s.spatial_loss.name, **s.spatial_loss.args)
                               for n, s in r.teachers.items()}

        opt_kwargs: dict[str, Any] = dict(lr=r.optim.lr, betas=r.optim.betas, eps=r.optim.eps,
                                          weight_decay=r.optim.weight_decay)
        if r.optim.fused is not None:
            opt_kwargs["fused"] = r.optim.fused
        if r.train.channels_last:
            distiller = distiller.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(self._param_groups(distiller, r.optim.weight_decay), **opt_kwargs)
        self.distiller, self.optimizer = acc.prepare(distiller, optimizer)
        if r.train.compile:
            self.unwrapped.student.compile()  # in place: DDP and the checkpoint keys are unchanged
        # Not prepared: Accelerate would step it once per process; ours steps once per optimiser step.
        self.scheduler = build_scheduler(optimizer, self.lr_multiplier)
        # Its state goes into trainer_state.json: Accelerate unpickles registered objects with
        # weights_only=False, and a checkpoint must never be able to run code.
        self.source = self.registry.build("dataset", r.data.source.name, **r.data.source.args)
        if self.cache is not None and r.cache.verify:
            self._verify_cache()

        if self._resume:
            self.load_latest_checkpoint()

    def teacher_dtype(self) -> torch.dtype:
        choice = self.recipe.train.teacher_dtype
        if choice == "auto":
            mp = self.recipe.train.mixed_precision
            choice = mp if mp != "no" and self.accelerator.device.type == "cuda" else "fp32"
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]

    def _open_cache(self, all_teachers: list[str]) -> tuple[Optional[FeatureCache], set[str]]:
        spec = self.recipe.cache
        if spec is None:
            return None, set()
        cache = FeatureCache(spec.path)
        names = spec.teachers if spec.teachers is not None else [t for t in all_teachers if t in cache.teachers]
        for n in names:
            if n not in cache.teachers:
                raise CacheMismatchError(f"cache.teachers: {n!r} is not in the cache at {spec.path} "
                                         f"(it holds {', '.join(cache.teachers)})")
        views = self.recipe.augment.views
        if views is not None and views != cache.views:
            raise CacheMismatchError(f"augment.views is {views} but the cache at {spec.path} holds {cache.views} views")
        return cache, set(names)

    def _verify_cache(self) -> None:
        """Rebuild each cached teacher once (weights, no forward) and compare fingerprints, data,
        augmentation, seed and crop size with the cache's index."""
        torch.manual_seed(self.recipe.train.seed)
        teachers = {n: build_teacher(self.recipe, n, self.registry) for n in self.cached}
        crops = {tuple(self.crop_size(s)) for p in self.plans for s in p.rank_slots[self.accelerator.process_index]}
        crop = tuple(self.cache.index["augment"]["crop_size"])
        if crops != {crop}:
            raise CacheMismatchError(f"data.crop_size: this run crops {sorted(crops)}, the cache at "
                                     f"{self.cache.path} holds {crop[0]}x{crop[1]} crops; set data.crop_size "
                                     f"to [{crop[0]}, {crop[1]}]")
        self.cache.verify(run_identity(self.recipe, self.source, teachers, crop, self.cache.views))
        del teachers

    def lr_multiplier(self, step: int) -> float:
        sched = self.recipe.schedule
        plan = stage_at(self.plans, step) or self.plans[-1]
        if plan.restart_schedule:
            return lr_multiplier(step - plan.start_step, plan.steps, sched.warmup_steps, sched.min_lr_ratio,
                                 sched.name)
        return lr_multiplier(step, self.recipe.train.steps, sched.warmup_steps, sched.min_lr_ratio, sched.name)

    def _param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        """No weight decay on biases, norms, position embeddings and tokens (1-d or named so)."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or any(k in name for k in ("pos_embed", "cls_token", "register", "token"))
            (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def crop_size(self, slot: Slot) -> tuple[int, int]:
        if self.recipe.data.crop_size:
            return tuple(self.recipe.data.crop_size)
        if self.cache is not None and any(t in self.cached for t in slot.teachers):
            return tuple(self.cache.index["augment"]["crop_size"])
        return preprocess.covering_size([self.teachers[t].input_size for t in slot.teachers], slot.student_resolution)

    @property
    def unwrapped(self) -> Distiller:
        return self.accelerator.unwrap_model(self.distiller)

    def expected_number(self, step: int) -> int:
        """Global number of the first sample of ``step`` under this run's plan."""
        plan = stage_at(self.plans, step)
        if plan is None:
            last = self.plans[-1]
            return last.number_base + last.steps * self.recipe.train.grad_accum * last.consumption
        return plan.number_base + (step - plan.start_step) * self.recipe.train.grad_accum * plan.consumption

    def effective_batch(self, plan: Optional[StagePlan] = None) -> int:
        plan = plan or self.stage or self.plans[0]
        return plan.consumption * self.recipe.train.grad_accum

    def enter_stage(self, plan: StagePlan, step: int) -> list[SlotRuntime]:
        """Build this rank's slots for ``plan`` with loaders positioned at ``step``."""
        r, acc = self.recipe, self.accelerator
        self.stage = plan
        micro = r.train.grad_accum
        runtimes = []
        for slot in plan.rank_slots[acc.process_index]:
            teachers = {t: self.teachers[t] for t in slot.teachers if t not in self.cached}
            uses_cache = any(t in self.cached for t in slot.teachers)
            dataset = AugmentedImages(self.source, self.crop_size(slot), r.augment.scale, r.augment.ratio,
                                      r.augment.hflip, cache=self.cache if uses_cache else None)
            views = self.cache.views if self.cache is not None else r.augment.views
            sampler = StepBatchSampler(len(self.source), slot.batch_size, r.train.seed, offset=slot.offset,
                                       stride=plan.consumption, base=plan.number_base,
                                       start=(step - plan.start_step) * micro, stop=plan.steps * micro, views=views,
                                       **sampling_kwargs(self.source))
            sampler.base += self._number_shift
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate, num_workers=r.data.num_workers,
                persistent_workers=r.data.num_workers > 0, pin_memory=acc.device.type == "cuda",
                prefetch_factor=4 if r.data.num_workers > 0 else None,
                worker_init_fn=loader_worker_init if r.data.num_workers > 0 else None)
            runtimes.append(SlotRuntime(slot, group_teachers(teachers), dataset, iter(loader)))
        return runtimes

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def teacher_targets(self, images01: Tensor, resize_sets: list[TeacherGroup]) -> dict[str, TeacherOutput]:
        def check(name: str, teacher: Teacher, out: Any, batch: int) -> None:
            check_teacher_output(name, self.recipe.teachers[name].plugin, teacher, out, batch)

        return compute_targets(self.teachers, resize_sets, images01, self.accelerator.autocast(), check)

    def student_resolution(self, slot: Slot, step: int) -> tuple[int, int]:
        options = slot.student_resolution
        if len(options) == 1:
            return tuple(options[0])
        # Seeded by step only: every rank of a group makes the same choice.
        return tuple(options[_mix(self.recipe.train.seed, step, 0x5E5) % len(options)])

    def losses(self, preds: dict, targets: dict[str, TeacherOutput], scale: dict[str, float]) -> dict[str, Tensor]:
        """Per-teacher summary and spatial losses (unweighted) plus the weighted ``total``.

        Heads of teachers absent from this batch get a zero-weighted term so that DDP sees
        every parameter used on every rank (see radio_core.partition)."""
        r = self.recipe
        terms: dict[str, Tensor] = {}
        total = next(iter(preds.values()))[1 if next(iter(preds.values()))[0] is None else 0].new_zeros(())
        for name, (pred_summary, pred_spatial) in preds.items():
            target = targets.get(name)
            if target is None:
                total = total + sum(0.0 * p.sum() for p in (pred_summary, pred_spatial) if p is not None)
                continue
            spec = r.teachers[name]
            target = self.unwrapped.normalize_targets(name, target)
            w = spec.weight * scale.get(name, 1.0)
            if pred_summary is not None and target.summary is not None:
                loss = self.summary_losses[name](pred_summary, target.summary)
                terms[f"{name}/summary"] = loss
                total = total + w * spec.summary_weight * loss
            elif pred_summary is not None:
                total = total + 0.0 * pred_summary.sum()
            if pred_spatial is not None:
                p, t = match_grids(pred_spatial, target.spatial)
                loss = self.spatial_losses[name](p, t)
                terms[f"{name}/spatial"] = loss
                total = total + w * spec.spatial_weight * loss
        terms["total"] = total
        return terms

    def slot_targets(self, rt: SlotRuntime, batch: dict, images01: Tensor) -> dict[str, TeacherOutput]:
        """Live teachers' targets plus cached teachers' targets read by the loader."""
        device = self.accelerator.device
        targets = self.teacher_targets(images01, rt.resize_sets)
        for name in rt.slot.teachers:
            if name in self.cached:
                summary, spatial = batch["targets"][name]
                targets[name] = TeacherOutput(summary=None if summary is None else summary.to(device).float(),
                                              spatial=spatial.to(device).float())
        return targets

    def estimate_target_norms(self, runtimes: list[SlotRuntime]) -> None:
        """Teacher-target statistics from ``train.target_norm_batches`` batches per rank, summed
        over all ranks (so every rank ends with identical buffers, whichever teachers it runs).
        The batches come from a separate range of sample numbers: the training order is
        unchanged."""
        norms = self.unwrapped.target_norms
        if not norms or all(bool(m.ready) for parts in norms.values() for m in parts.values()):
            return
        r, acc = self.recipe, self.accelerator
        for rt in runtimes:
            sampler = StepBatchSampler(len(self.source), rt.slot.batch_size, r.train.seed + 7919,
                                       offset=rt.slot.offset, stride=self.stage.consumption,
                                       stop=r.train.target_norm_batches, **sampling_kwargs(self.source))
            for refs in sampler:
                batch = collate([rt.dataset[ref] for ref in refs])
                images01 = preprocess.to_float(batch["image"].to(acc.device))
                for name, target in self.slot_targets(rt, batch, images01).items():
                    if name in norms:
                        if "summary" in norms[name] and target.summary is not None:
                            norms[name]["summary"].update(target.summary)
                        if "spatial" in norms[name]:
                            norms[name]["spatial"].update_spatial(target.spatial)
        for parts in norms.values():
            for m in parts.values():
                m.all_reduce_()
                m.finalize()
        acc.print(f"target statistics estimated for {', '.join(norms)} "
                  f"({r.train.target_norm_batches} batch(es) per rank)")

    def forward_losses(self, rt: SlotRuntime, batch: dict, step: int) -> dict[str, Tensor]:
        device = self.accelerator.device
        images01 = preprocess.to_float(batch["image"].to(device, non_blocking=True))
        targets = self.slot_targets(rt, batch, images01)
        student_in = preprocess.resize(images01, self.student_resolution(rt.slot, step))
        with self.accelerator.autocast():
            _, preds = self.distiller(student_in, return_predictions=True)
        return self.losses(preds, targets, self.stage.teacher_scale(self.accelerator.num_processes))

    def train_step(self, work: list[tuple[SlotRuntime, dict]], step: int) -> dict[str, Tensor]:
        """One optimiser step over this rank's (slot, batch) pairs (all micro-steps)."""
        acc, r = self.accelerator, self.recipe
        self.distiller.train()
        summed: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        micro = r.train.grad_accum
        for k, (rt, batch) in enumerate(work):
            last = k == len(work) - 1
            # Reseeded per (step, slot, micro-step): student-side randomness is independent of
            # history (exact resume) and of the rank (the same samples get the same randomness
            # however the groups are laid out over processes).
            seed = _mix(r.train.seed, step, rt.slot.offset, k // max(1, len(work) // micro))
            torch.manual_seed(seed)
            random.seed(seed)
            with (contextlib.nullcontext() if last else acc.no_sync(self.distiller)):
                terms = self.forward_losses(rt, batch, step)
                acc.backward(terms["total"] / micro)
            for key, v in terms.items():
                summed[key] = summed.get(key, 0) + v.detach()
                counts[key] = counts.get(key, 0) + 1
        summed = {k: v / counts[k] for k, v in summed.items()}
        summed["total"] = summed["total"] * len(work) / micro  # the step's objective on this rank
        finite = bool(torch.isfinite(summed["total"]).item()) if r.train.skip_nonfinite else True
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_steps += 1
            self.state.nonfinite_in_row += 1
            bad = [k for k, v in summed.items() if k != "total" and not torch.isfinite(v).item()]
            acc.print(f"step {step}: non-finite loss from {', '.join(bad) or 'total'}; step skipped "
                      f"({self.state.nonfinite_in_row} in a row)")
            if self.state.nonfinite_in_row >= r.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.state.nonfinite_in_row} non-finite losses in a row (from {', '.join(bad) or 'total'}); "
                    "stopping. Lower optim.lr or enable train.grad_clip; the last checkpoint is intact.")
        else:
            self.state.nonfinite_in_row = 0
            if r.train.grad_clip:
                summed["grad_norm"] = acc.clip_grad_norm_(self.distiller.parameters(), r.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        summed["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        return summed

    def reduce_metrics(self, terms: dict[str, Tensor]) -> dict[str, float]:
        """Mean of each metric over the ranks that computed it (teachers differ per rank)."""
        acc = self.accelerator
        keys = ["total"] + [f"{t}/{h}" for t in self.stage.teachers for h in ("summary", "spatial")]
        values = torch.zeros(2, len(keys), device=acc.device)
        for i, k in enumerate(keys):
            if k in terms:
                values[0, i], values[1, i] = terms[k].float(), 1.0
        values = acc.reduce(values, "sum")
        out = {f"loss/{k}": float(values[0, i] / values[1, i]) for i, k in enumerate(keys) if values[1, i] > 0}
        # Rank 0's optimiser scalars are the same everywhere.
        for k in ("grad_norm", "lr"):
            if k in terms:
                out[k] = float(terms[k])
        return out

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        acc, r = self.accelerator, self.recipe
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            (self.out_dir / "recipe.yaml").write_text(dump_recipe(r))
        logger = MetricsLogger(self.out_dir, r.logging, enabled=acc.is_main_process)
        sample_log = (open(self.out_dir / f"samples_rank{acc.process_index}.jsonl", "a")
                      if r.data.log_samples else None)
        self._install_signal_handlers()
        start = self.state.step
        acc.print(f"radio-distill: {acc.num_processes} process(es), steps {start}->{r.train.steps}\n"
                  + describe(self.plans, r.train.grad_accum))
        self.registry.hook.radio_train_start(trainer=self)
        progress = _progress(start, r.train.steps, enabled=acc.is_main_process and r.logging.progress)
        last: dict[str, float] = {}
        t0, samples0 = time.perf_counter(), 0
        try:
            for plan in self.plans:
                if plan.end_step <= self.state.step:
                    continue
                runtimes = self.enter_stage(plan, self.state.step)
                self.estimate_target_norms(runtimes)
                for step in range(self.state.step, plan.end_step):
                    work = [(rt, next(rt.iterator)) for _ in range(r.train.grad_accum) for rt in runtimes]
                    self._count_bad_images(work)
                    if sample_log is not None:
                        keys = [self.source.key(int(i)) for _, b in work for i in b["index"]]
                        sample_log.write(json.dumps({"step": step, "keys": keys}) + "\n")
                        sample_log.flush()
                    terms = self.train_step(work, step)
                    self.state.step = step + 1
                    self.state.next_number = self.expected_number(step + 1) + self._number_shift
                    self.state.world_size = acc.num_processes
                    self.state.samples_seen += self.effective_batch(plan)
                    samples0 += self.effective_batch(plan)
                    metrics: dict[str, float] = {}
                    done = self.state.step == r.train.steps
                    evaluate = bool(r.eval.every) and self.state.step % r.eval.every == 0
                    log = self.state.step % r.train.log_every == 0 or done or step == start or evaluate
                    if log:
                        self._sync_bad_images()
                        elapsed = time.perf_counter() - t0
                        metrics = self.reduce_metrics(terms)
                        metrics.update(images_per_s=samples0 / max(elapsed, 1e-9), samples=self.state.samples_seen,
                                       bad_images=self.state.bad_images, stage=plan.index)
                        if evaluate:
                            metrics.update(self.evaluate_fidelity())
                        t0, samples0 = time.perf_counter(), 0
                        logger.log(self.state.step, metrics)
                        last = metrics
                        progress.set_postfix(loss=f"{metrics['loss/total']:.4f}",
                                             img_s=f"{metrics['images_per_s']:.1f}")
                    progress.update(1)
                    self.registry.hook.radio_step_end(trainer=self, step=self.state.step, metrics=metrics)
                    # Every rank takes the same branches below (the stop flag is reduced), so the
                    # collectives inside stay matched.
                    stop = self._stop_requested_anywhere()
                    if self.state.step % r.checkpoint.every == 0 or done or stop or self.state.step == plan.end_step:
                        if not log:
                            self._sync_bad_images()
                        self.save_checkpoint()
                    if stop:
                        acc.print(f"stop requested: checkpoint written at step {self.state.step}; resume with --resume")
                        return last
        finally:
            progress.close()
            logger.close()
            if sample_log is not None:
                sample_log.close()
            self._restore_signal_handlers()
        if self.state.step == r.train.steps and r.checkpoint.export:
            self.export(self.out_dir / "export")
        if self.state.step == r.train.steps and r.eval.report:
            self.write_report()
        self.registry.hook.radio_train_end(trainer=self)
        return last

    def _eval_run(self):
        from .eval.loading import LoadedRun

        weights = self.out_dir / "export" / "model.safetensors"
        return LoadedRun(self.out_dir, self.recipe, self.unwrapped, dict(self.teachers), weights)

    def evaluate_fidelity(self) -> dict[str, float]:
        """Fidelity of every head whose teacher runs on the main process, on ``eval.source``
        images at ``eval.resolutions`` (logged as fidelity/<res>/<teacher>/<head>/<metric>)."""
        acc = self.accelerator
        out: dict[str, float] = {}
        if acc.is_main_process and self.teachers:
            from .eval.report import eval_images
            from .eval.tasks import fidelity

            run = self._eval_run()
            res = self.recipe.eval.resolutions or [self.recipe.student.resolution[0][0]]
            results = fidelity(run.distiller, self.teachers, eval_images(run, self.recipe.eval.images), res)
            out = {f"fidelity/{r}/{head}/{m}": v for r, row in results.items() for head, ms in row.items()
                   for m, v in ms.items()}
            self.distiller.train()
        acc.wait_for_everyone()
        return out

    def write_report(self) -> Optional[Path]:
        acc = self.accelerator
        path = None
        if acc.is_main_process:
            from .eval.report import write_report

            path = write_report(self._eval_run())
            acc.print(f"report written to {path}")
        acc.wait_for_everyone()
        return path

    def _sync_bad_images(self) -> None:
        local = torch.tensor([float(self._bad_local)], device=self.accelerator.device)
        self.state.bad_images = self._bad_base + int(self.accelerator.reduce(local, "sum").item())

    def _count_bad_images(self, work: list) -> None:
        for _, b in work:
            bad = int((~b["valid"]).sum())
            if bad:
                self._bad_local += bad
                for e in b["errors"]:
                    self.accelerator.print(f"skipped unreadable image: {e}")

    def _stop_requested_anywhere(self) -> bool:
        """A signal may reach one rank only; all ranks must checkpoint and stop together."""
        if self.accelerator.num_processes == 1:
            return self._stop_requested
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        final = self.ckpt_dir / f"{CHECKPOINT_PREFIX}{self.state.step:08d}"
        tmp = self.ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{self.state.step:08d}"
        if acc.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"trainer": self.state.state_dict(),
                                                      "scheduler": self.scheduler.state_dict(),
                                                      "recipe_steps": self.recipe.train.steps}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: a kill leaves either the old or the new directory
            self._prune_checkpoints()
            self.registry.hook.radio_checkpoint_saved(trainer=self, path=str(final))
        acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        for old in list_checkpoints(self.ckpt_dir)[:-self.recipe.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest_checkpoint(self) -> Optional[Path]:
        """Load the newest loadable checkpoint; a corrupt one is reported and the previous used."""
        acc = self.accelerator
        for path in reversed(list_checkpoints(self.ckpt_dir)):
            try:
                saved = json.loads((path / STATE_FILE).read_text())
                acc.load_state(str(path))  # safetensors model; optimizer and RNG via weights_only=True
                self.state.load_state_dict(saved["trainer"])
                self.scheduler.load_state_dict(saved["scheduler"])
            except Exception as exc:  # noqa: BLE001 - fall back to an older checkpoint
                acc.print(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {exc}); trying an older one")
                continue
            self._bad_base = self.state.bad_images
            expected = self.expected_number(self.state.step)
            if saved["trainer"].get("world_size", acc.num_processes) != acc.num_processes:
                # Continue the global sample numbering where the old world size left it.
                self._number_shift = self.state.next_number - expected
                acc.print(f"world size changed {saved['trainer']['world_size']} -> {acc.num_processes}: "
                          f"continuing at sample {self.state.next_number}")
            acc.print(f"resumed from {path} (step {self.state.step})")
            return path
        acc.print(f"no checkpoint under {self.ckpt_dir}; starting from step 0")
        return None

    def export(self, path: Path) -> Path:
        """Standalone student + adaptors (safetensors) with the config needed to rebuild them."""
        from .model import save_export

        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_export(self.unwrapped, self.recipe, self.teachers, path)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ signals
    def request_stop(self) -> None:
        """Checkpoint after the step in flight and return from ``fit`` (what SIGTERM does)."""
        self._stop_requested = True

    def _install_signal_handlers(self) -> None:
        self._old_handlers = {}

        def request_stop(signum, frame):  # noqa: ARG001
            # Launchers often deliver SIGTERM twice (to the process and its group): only a
            # second Ctrl-C means "give up without the checkpoint".
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not in the main thread
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, handler)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


class MetricsLogger:
    """JSONL file + TensorBoard, on the main process only."""

    def __init__(self, out_dir: Path, spec: Any, enabled: bool) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        if spec.jsonl:
            self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if spec.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="distill", unit="step", dynamic_ncols=True)
