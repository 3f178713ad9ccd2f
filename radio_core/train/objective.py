"""The distillation objective: teacher targets (live or cached), target-normalisation
statistics, and the weighted per-teacher summary + spatial losses of one batch."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..data.augment import collate
from ..data.mosaic import make_mosaic, mosaic_valid
from ..data.sampling import StepBatchSampler, _mix, sampling_kwargs
from ..models import preprocess
from ..models.distiller import Distiller
from ..models.losses import match_grids
from ..models.teachers import TeacherGroup, check_teacher_output, compute_targets
from ..plan.partition import Slot, StagePlan
from ..protocols import CropGeometry, Teacher, TeacherOutput
from ..recipe import Recipe
from ..registry import Registry
from .regularizers import Mesa
from .stages import SlotRuntime
from .views import cut_windows, sample_windows, window_size


def stateful_losses(distiller: Distiller) -> dict[tuple[str, str], nn.Module]:
    """(teacher, part) -> loss modules that estimate statistics before training."""
    return {(n, part): m for n, parts in distiller.losses.items() for part, m in parts.items()
            if hasattr(m, "observe") and hasattr(m, "finalize")}


class Objective:
    """Targets and losses for one rank: ``teachers`` are the live teachers this rank runs,
    ``cached`` the names whose targets the loader reads from the feature cache."""

    def __init__(self, recipe: Recipe, registry: Registry, teachers: dict[str, Teacher], cached: set[str],
                 accelerator: Any) -> None:
        self.recipe, self.teachers, self.cached, self.accelerator = recipe, teachers, cached, accelerator
        self._checked: set[str] = set()  # teachers whose first outputs were checked to be finite
        spec = recipe.balance
        self.balancer = registry.build("balancer", spec.name, **spec.args) if spec is not None else None
        #: MESA (radio_core.train.regularizers), set by the trainer when the recipe asks for it
        self.mesa: Optional[Mesa] = None

    # -- targets ------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, images01: Tensor, resize_sets: list[TeacherGroup],
                        teachers: Optional[dict[str, Teacher]] = None) -> dict[str, TeacherOutput]:
        """Targets of the live ``teachers`` (default: the recipe's instances) of ``resize_sets``."""
        def check(name: str, teacher: Teacher, out: Any, batch: int) -> None:
            first = name not in self._checked  # values checked once: it costs a host sync
            check_teacher_output(name, self.recipe.teachers[name].plugin, teacher, out, batch, finite=first)
            self._checked.add(name)

        return compute_targets(teachers or self.teachers, resize_sets, images01, self.accelerator.autocast(), check)

    def slot_targets(self, rt: SlotRuntime, batch: dict, images01: Tensor) -> dict[str, TeacherOutput]:
        """Live teachers' targets plus cached teachers' targets read by the loader."""
        device = self.accelerator.device
        targets = self.teacher_targets(images01, rt.resize_sets, rt.teachers)
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
        # losses that keep statistics (e.g. angle_balanced) estimate them from the same batches
        stats = {k: m for k, m in stateful_losses(distiller).items() if k[0] in stage.teachers and not bool(m.ready)}
        self._estimate(distiller, runtimes, stage, source, names, window=0, stats=stats)

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
                  names: list[str], window: int, stats: Optional[dict] = None) -> None:
        """Statistics of ``names`` from ``train.target_norm_batches`` batches per rank, summed over
        all ranks (every rank takes part, so every rank ends with identical buffers, whichever
        teachers it runs). The batches come from a separate range of sample numbers (``window``
        picks one): the training order is unchanged."""
        stats = stats or {}
        if not names and not stats:
            return
        norms = distiller.target_norms
        r, acc = self.recipe, self.accelerator
        kept: list[tuple[str, str, Tensor]] = []  # raw targets the losses' statistics need
        for rt in runtimes:
            if not (set(names) | {n for n, _ in stats}) & set(rt.slot.teachers):
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
                    if not keep.numel():
                        continue
                    for part in ("summary", "spatial"):
                        if (name, part) in stats and getattr(target, part) is not None:
                            kept.append((name, part, getattr(target, part)))
                    if name in names:
                        if "summary" in norms[name] and target.summary is not None:
                            norms[name]["summary"].update(target.summary)
                        if "spatial" in norms[name]:
                            norms[name]["spatial"].update_spatial(target.spatial)
        for name in names:
            for m in norms[name].values():
                m.all_reduce_()
                m.finalize()
        if names and window == 0:
            acc.print(f"target statistics estimated for {', '.join(names)} "
                      f"({r.train.target_norm_batches} batch(es) per rank)")
        if stats:
            self._estimate_loss_statistics(distiller, stats, kept)

    def _estimate_loss_statistics(self, distiller: Distiller, stats: dict, kept: list) -> None:
        """Feed the kept targets, in the space the losses see (after target normalisation), to
        the losses that estimate statistics; sum over ranks; finalise."""
        for name, part, raw in kept:
            norms = distiller.target_norms[name] if name in distiller.target_norms else {}
            if part in norms:
                raw = norms[part].normalize_summary(raw) if part == "summary" else norms[part].normalize_spatial(raw)
            stats[(name, part)].observe(raw)
        dims = {h.name: (h.summary_dim, h.spatial_dim) for h in distiller.heads}
        for (name, part), m in stats.items():
            if hasattr(m, "prepare_statistics"):  # ranks that never ran this teacher add zeros
                m.prepare_statistics(dims[name][0 if part == "summary" else 1], self.accelerator.device)
            m.all_reduce_()
            m.finalize()
        self.accelerator.print(f"loss statistics estimated for {', '.join(f'{n}/{p}' for n, p in stats)}")

    # -- student side -------------------------------------------------------------------------
    def student_resolution(self, slot: Slot, step: int) -> tuple[int, int]:
        options = slot.student_resolution
        if len(options) == 1:
            return tuple(options[0])
        # Seeded by step only: every rank of a group makes the same choice.
        return tuple(options[_mix(self.recipe.train.seed, step, 0x5E5) % len(options)])

    def losses(self, distiller: Distiller, preds: dict, targets: dict[str, TeacherOutput],
               scale: dict[str, float], *, geometry: Optional[dict[str, CropGeometry]] = None,
               valid: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Per-teacher summary and spatial losses (unweighted) plus the weighted ``total``.

        ``valid`` (a CPU bool per sample): samples whose image could not be read are left out of
        every loss term (they were fed as black images only to keep the batch shape). Heads of
        teachers absent from this batch, or with no readable sample in it, get a zero-weighted
        term so that DDP sees every parameter used on every rank (see radio_core.plan.partition).
        ``geometry``: the views of each teacher and of the student (shifted views); with a
        ``balance`` plugin the losses are computed per image and weighted by it."""
        r = self.recipe
        geometry = geometry or {}
        terms: dict[str, Tensor] = {}
        first = next(iter(preds.values()))
        total = first[1 if first[0] is None else 0].new_zeros(())
        per_image: dict[str, Tensor] = {}  # teacher -> (B,) weighted summary + spatial loss
        keep = _readable(valid, total)
        for name, (pred_summary, pred_spatial) in preds.items():
            target = targets.get(name)
            if target is None or (keep is not None and keep.numel() == 0):
                total = total + sum(0.0 * p.sum() for p in (pred_summary, pred_spatial) if p is not None)
                continue
            geom = geometry.get(name)
            if keep is not None:
                pred_summary, pred_spatial = (None if p is None else p[keep] for p in (pred_summary, pred_spatial))
                target = TeacherOutput(summary=None if target.summary is None else target.summary[keep],
                                       spatial=target.spatial[keep])
                if geom is not None:
                    geom = CropGeometry(geom.student_box[keep.to(geom.student_box.device)],
                                        geom.teacher_box[keep.to(geom.teacher_box.device)])
            spec = r.teachers[name]
            target = distiller.normalize_targets(name, target)
            fns = distiller.losses[name]
            parts = []
            if pred_summary is not None and target.summary is not None:
                parts.append(("summary", spec.summary_weight, fns["summary"], pred_summary, target.summary, None))
            elif pred_summary is not None:
                total = total + 0.0 * pred_summary.sum()
            if pred_spatial is not None:
                parts.append(("spatial", spec.spatial_weight, fns["spatial"], pred_spatial, target.spatial, geom))
            w = spec.weight * scale.get(name, 1.0)
            for part, weight, fn, pred, tgt, geom in parts:
                if self.balancer is None:
                    loss = _apply(fn, pred, tgt, geom)
                else:
                    values = torch.stack([_apply(fn, pred[i:i + 1], tgt[i:i + 1], _sample(geom, i))
                                          for i in range(pred.shape[0])])
                    per_image[name] = per_image.get(name, 0) + weight * values
                    loss = values.mean()
                terms[f"{name}/{part}"] = loss
                if self.balancer is None:
                    total = total + w * weight * loss
        if per_image:
            gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))  # loop-reseeded RNG: exact resume
            weights = self.balancer({n: v.detach() for n, v in per_image.items()}, gen)
            for name, values in per_image.items():
                w = r.teachers[name].weight * scale.get(name, 1.0)
                total = total + w * (weights[name].to(values) * values).mean()
                terms[f"{name}/kept"] = weights[name].float().mean()
        terms["total"] = total
        return terms

    def forward_losses(self, model: torch.nn.Module, distiller: Distiller, rt: SlotRuntime, batch: dict,
                       step: int, stage: StagePlan) -> dict[str, Tensor]:
        """Targets, student forward (``model``: the prepared, possibly DDP-wrapped distiller)
        and losses of one micro-batch."""
        acc = self.accelerator
        images01 = preprocess.to_float(batch["image"].to(acc.device, non_blocking=True))
        valid = batch.get("valid")
        if rt.slot.mosaic:  # the group's canvases replace its images for the student and every teacher
            images01, valid = make_mosaic(images01, rt.slot.mosaic), mosaic_valid(valid, rt.slot.mosaic)
        resolution = self.student_resolution(rt.slot, step)
        geometry: dict[str, CropGeometry] = {}
        if self.recipe.augment.shift > 0:
            targets, student_in, geometry = self.shifted_views(rt, images01, resolution)
        else:
            targets = self.slot_targets(rt, batch, images01)
            student_in = preprocess.resize(images01, resolution)
        mesa = self.mesa if self.mesa is not None and self.mesa.active(step) else None
        with acc.autocast():
            ema_preds = mesa.targets(student_in, set(targets)) if mesa is not None else None
            _, preds = model(student_in, return_predictions=True, active=set(targets))
        terms = self.losses(distiller, preds, targets, stage.teacher_scale(acc.num_processes), geometry=geometry,
                            valid=valid)
        if mesa is not None:  # MESA: every head also follows the EMA model's output
            terms["mesa"] = mesa.distance(preds, ema_preds, set(targets), _readable(valid, student_in))
            terms["total"] = terms["total"] + mesa.weight * terms["mesa"]
        return terms

    def shifted_views(self, rt: SlotRuntime, images01: Tensor, resolution: tuple[int, int]):
        """Shift-equivariant distillation: the student's window of each crop (resized to its
        resolution), every teacher group's own window, their targets, and each teacher's
        ``CropGeometry``. Windows come from the RNG the loop reseeds per micro-step."""
        shift, b = self.recipe.augment.shift, images01.shape[0]
        student_box = sample_windows(b, shift)
        student_in = cut_windows(images01, student_box, resolution)
        size = window_size(tuple(images01.shape[-2:]), shift)
        targets, geometry = {}, {}
        for group in rt.resize_sets:
            box = sample_windows(b, shift)
            targets.update(self.teacher_targets(cut_windows(images01, box, size), [group], rt.teachers))
            for name in group.names:  # on the host: a loss's output shapes depend on the views' sizes
                geometry[name] = CropGeometry(student_box, box)
        return targets, student_in, geometry


def _apply(fn: nn.Module, pred: Tensor, target: Tensor, geometry: Optional[CropGeometry]) -> Tensor:
    """One loss term: geometry-aware losses get both grids as they are plus the views; the
    others get the grids matched to the larger one (AM-RADIO's rule)."""
    if getattr(fn, "wants_geometry", False):
        return fn(pred, target, geometry=geometry)
    if pred.dim() == 4:
        pred, target = match_grids(pred, target)
    return fn(pred, target)


def _readable(valid: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """Indices of the readable samples, or None when all are."""
    if valid is None or bool(valid.all()):
        return None
    return valid.nonzero().flatten().to(like.device)


def _sample(geometry: Optional[CropGeometry], i: int) -> Optional[CropGeometry]:
    if geometry is None:
        return None
    return CropGeometry(geometry.student_box[i:i + 1], geometry.teacher_box[i:i + 1])
