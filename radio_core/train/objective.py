"""The distillation objective: teacher targets (live or cached), target-normalisation
statistics, and the weighted per-teacher summary + spatial losses of one batch."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..data.augment import collate
from ..data.sampling import StepBatchSampler, _mix, sampling_kwargs
from ..models import preprocess
from ..models.distiller import Distiller
from ..models.losses import match_grids
from ..models.teachers import TeacherGroup, check_teacher_output, compute_targets
from ..plan.partition import Slot, StagePlan
from ..protocols import Teacher, TeacherOutput
from ..recipe import Recipe
from ..registry import Registry
from .stages import SlotRuntime


class Objective:
    """Targets and losses for one rank: ``teachers`` are the live teachers this rank runs,
    ``cached`` the names whose targets the loader reads from the feature cache."""

    def __init__(self, recipe: Recipe, registry: Registry, teachers: dict[str, Teacher], cached: set[str],
                 accelerator: Any) -> None:
        self.recipe, self.teachers, self.cached, self.accelerator = recipe, teachers, cached, accelerator
        self._checked: set[str] = set()  # teachers whose first outputs were checked to be finite
        self.summary_losses = {n: registry.build("loss", s.summary_loss.name, **s.summary_loss.args)
                               for n, s in recipe.teachers.items()}
        self.spatial_losses = {n: registry.build("loss", s.spatial_loss.name, **s.spatial_loss.args)
                               for n, s in recipe.teachers.items()}

    # -- targets ------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, images01: Tensor, resize_sets: list[TeacherGroup]) -> dict[str, TeacherOutput]:
        def check(name: str, teacher: Teacher, out: Any, batch: int) -> None:
            first = name not in self._checked  # values checked once: it costs a host sync
            check_teacher_output(name, self.recipe.teachers[name].plugin, teacher, out, batch, finite=first)
            self._checked.add(name)

        return compute_targets(self.teachers, resize_sets, images01, self.accelerator.autocast(), check)

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

    def estimate_target_norms(self, distiller: Distiller, runtimes: list[SlotRuntime], stage: StagePlan,
                              source: Any) -> None:
        """At a stage's start: statistics of this stage's teachers that have none yet, so each
        teacher's are estimated when it first trains (a teacher of a later stage waits for it)."""
        norms = distiller.target_norms
        names = [n for n in stage.teachers if n in norms and not all(bool(m.ready) for m in norms[n].values())]
        self._estimate(distiller, runtimes, stage, source, names, window=0)

    def reestimate_target_norms(self, distiller: Distiller, runtimes: list[SlotRuntime], stage: StagePlan,
                                source: Any, step: int, first_steps: dict[str, int]) -> None:
        """Before ``step``: re-estimate the statistics of the teachers whose first
        ``train.target_norm_steps`` training steps include ``step`` at a multiple of
        ``train.target_norm_every``. The batches are a pure function of (seed, step), and the
        statistics are buffers in the checkpoint, so a resumed run re-estimates exactly as an
        uninterrupted one."""
        r = self.recipe.train
        norms = distiller.target_norms
        names = [n for n in stage.teachers if n in norms and 0 < step - first_steps[n] < r.target_norm_steps
                 and (step - first_steps[n]) % r.target_norm_every == 0]
        for n in names:
            for m in norms[n].values():
                m.reset()
        self._estimate(distiller, runtimes, stage, source, names, window=step)

    def _estimate(self, distiller: Distiller, runtimes: list[SlotRuntime], stage: StagePlan, source: Any,
                  names: list[str], window: int) -> None:
        """Statistics of ``names`` from ``train.target_norm_batches`` batches per rank, summed over
        all ranks (every rank takes part, so every rank ends with identical buffers, whichever
        teachers it runs). The batches come from a separate range of sample numbers (``window``
        picks one): the training order is unchanged."""
        if not names:
            return
        norms = distiller.target_norms
        r, acc = self.recipe, self.accelerator
        for rt in runtimes:
            if not set(names) & set(rt.slot.teachers):
                continue
            seed = r.train.seed + 7919 if window == 0 else _mix(r.train.seed + 7919, window, 0x7A5)
            sampler = StepBatchSampler(len(source), rt.slot.batch_size, seed,
                                       offset=rt.slot.offset, stride=stage.consumption,
                                       stop=r.train.target_norm_batches, **sampling_kwargs(source))
            for refs in sampler:
                batch = collate([rt.dataset[ref] for ref in refs])
                images01 = preprocess.to_float(batch["image"].to(acc.device))
                keep = batch["valid"].nonzero().flatten().to(acc.device)  # unreadable images: no statistics
                for name, target in self.slot_targets(rt, batch, images01).items():
                    target = TeacherOutput(summary=None if target.summary is None else target.summary[keep],
                                           spatial=target.spatial[keep])
                    if name in names and keep.numel():
                        if "summary" in norms[name] and target.summary is not None:
                            norms[name]["summary"].update(target.summary)
                        if "spatial" in norms[name]:
                            norms[name]["spatial"].update_spatial(target.spatial)
        for name in names:
            for m in norms[name].values():
                m.all_reduce_()
                m.finalize()
        if window == 0:
            acc.print(f"target statistics estimated for {', '.join(names)} "
                      f"({r.train.target_norm_batches} batch(es) per rank)")

    # -- student side -------------------------------------------------------------------------
    def student_resolution(self, slot: Slot, step: int) -> tuple[int, int]:
        options = slot.student_resolution
        if len(options) == 1:
            return tuple(options[0])
        # Seeded by step only: every rank of a group makes the same choice.
        return tuple(options[_mix(self.recipe.train.seed, step, 0x5E5) % len(options)])

    def losses(self, distiller: Distiller, preds: dict, targets: dict[str, TeacherOutput],
               scale: dict[str, float], valid: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Per-teacher summary and spatial losses (unweighted) plus the weighted ``total``.

        ``valid`` (a CPU bool per sample): samples whose image could not be read are left out of
        every loss term (they were fed as black images only to keep the batch shape). Heads of
        teachers absent from this batch, or with no readable sample in it, get a zero-weighted
        term so that DDP sees every parameter used on every rank (see radio_core.plan.partition)."""
        r = self.recipe
        terms: dict[str, Tensor] = {}
        first = next(iter(preds.values()))
        total = first[1 if first[0] is None else 0].new_zeros(())
        keep = None
        if valid is not None and not bool(valid.all()):
            keep = valid.nonzero().flatten().to(total.device)
        for name, (pred_summary, pred_spatial) in preds.items():
            target = targets.get(name)
            if target is None or (keep is not None and keep.numel() == 0):
                total = total + sum(0.0 * p.sum() for p in (pred_summary, pred_spatial) if p is not None)
                continue
            if keep is not None:
                pred_summary, pred_spatial = (None if p is None else p[keep] for p in (pred_summary, pred_spatial))
                target = TeacherOutput(summary=None if target.summary is None else target.summary[keep],
                                       spatial=target.spatial[keep])
            spec = r.teachers[name]
            target = distiller.normalize_targets(name, target)
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

    def forward_losses(self, model: torch.nn.Module, distiller: Distiller, rt: SlotRuntime, batch: dict,
                       step: int, stage: StagePlan) -> dict[str, Tensor]:
        """Targets, student forward (``model``: the prepared, possibly DDP-wrapped distiller)
        and losses of one micro-batch."""
        acc = self.accelerator
        images01 = preprocess.to_float(batch["image"].to(acc.device, non_blocking=True))
        targets = self.slot_targets(rt, batch, images01)
        student_in = preprocess.resize(images01, self.student_resolution(rt.slot, step))
        with acc.autocast():
            _, preds = model(student_in, return_predictions=True, active=set(targets))
        return self.losses(distiller, preds, targets, stage.teacher_scale(acc.num_processes), batch.get("valid"))
