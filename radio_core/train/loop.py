"""The distillation training loop (Accelerate).

One optimiser step:
  batch (uint8 crops) -> per teacher group: resize once -> per teacher: normalise -> frozen
  forward -> targets; student input: resize -> student + adaptor heads -> per-teacher losses
  (grids matched to the larger one) -> weighted sum -> backward -> clip -> AdamW -> LR schedule.

What lives elsewhere: building the optimiser and cache (``setup``), slots and loaders
(``stages``), targets and losses (``objective``), checkpoints (``checkpoint``), logging
(``metrics``), signals (``signals``).

Exact resume: model, optimiser and scheduler state come from the checkpoint; the data position
is the step number (sampling is a pure function of seed and sample number, see
``radio_core.data.sampling``); all other randomness (student CPE crops, window sizes,
multi-resolution choice) is reseeded from (seed, step, slot) before each forward.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from .. import lifecycle
from ..data.sampling import _mix
from ..models.distiller import Distiller, build_distiller
from ..models.teachers import build_teacher, with_upsampler
from ..plan.checks import check_mosaic_cache, check_student_resolutions
from ..plan.partition import StagePlan, describe, plan_stages, stage_at
from ..protocols import Teacher
from ..recipe import Recipe, RecipeError, dump_recipe
from ..registry import Registry, get_registry
from . import guard, outputs, regularizers, setup, stages
from .compiled import compile_model
from .guard import NonFiniteLossError, StepGuard  # noqa: F401 - re-exported
from .checkpoint import (  # noqa: F401 - re-exported
    Checkpointer,
    ResumeError,
    RunExistsError,
    TrainerState,
    check_new_run,
    hold_run_folder,
    prepare_out_dir,
    unlock_run_folder,
)
from .metrics import (  # noqa: F401
    BadDataError,
    BadImageCounter,
    MetricsLogger,
    progress_bar,
    reduce_losses,
)
from .objective import Objective
from .schedule import build_scheduler, lr_multiplier
from .signals import StopSignals
from .stages import SlotRuntime


class NotTrainedError(RuntimeError):
    """The run reached its last step without one step that learned anything."""


class Trainer:
    def __init__(self, recipe: Recipe, registry: Optional[Registry] = None, resume: bool = False,
                 accelerator: Any = None, recipe_path: str = "<recipe>", overwrite: bool = False) -> None:
        """``resume``: continue from the newest loadable checkpoint in ``output_dir`` (ResumeError
        if there are checkpoints and none loads). Without it, an ``output_dir`` that holds a run
        is refused (RunExistsError) unless ``overwrite``, which removes that run's outputs when
        training starts. Both checks happen before any model is built."""
        self.recipe, self.recipe_path = recipe, recipe_path
        self.out_dir = Path(recipe.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        # The main process holds the folder's lock for the run's life, before it looks inside.
        self._locked = hold_run_folder(self.out_dir)
        try:
            self._remove_outputs = check_new_run(self.out_dir, resume, overwrite)
            self._setup(registry, accelerator, resume)
        except BaseException:
            self.release_run_folder()
            raise

    def _setup(self, registry: Optional[Registry], accelerator: Any, resume: bool) -> None:
        recipe = self.recipe
        self.registry = registry or get_registry()
        if recipe.student.init is not None:  # a released model's architecture (formats.release)
            from ..formats.release import resolve_release

            self.recipe = recipe = resolve_release(recipe, self.registry)
        self.accelerator = accelerator or setup.make_accelerator(recipe)
        self.cpu_threads, self._threads_why = setup.set_cpu_threads(recipe, self.accelerator)
        self.state = TrainerState()
        self.signals = StopSignals()
        #: fit() returned early because SIGTERM/SIGINT asked it to (after a checkpoint).
        self.stopped = False
        self.checkpointer = Checkpointer(self.accelerator, self.ckpt_dir, recipe.checkpoint.keep)
        self.bad_images = BadImageCounter(self.accelerator)
        self.teachers: dict[str, Teacher] = {}
        #: Slot.teacher_key -> instance, for groups that run a teacher at their own resolution or
        #: upsampled by its FeatSharp
        self.teacher_variants: dict[tuple, Teacher] = {}
        self.stage: Optional[StagePlan] = None
        self._number_shift = 0  # added to sample numbers when resuming on another world size
        self._build()
        self.guard = StepGuard(self.accelerator, self.state, recipe.train.skip_nonfinite,
                               recipe.train.max_nonfinite_steps, recipe.student.name)
        # Accelerate's backward divides by its own accumulation count (1: ours is train.grad_accum)
        # and scales fp16 losses; without a scaler or DeepSpeed it is loss.backward() plus a no-op kernel.
        self._plain_backward = (self.accelerator.scaler is None and self.accelerator.gradient_accumulation_steps == 1
                                and self.accelerator.distributed_type.value != "DEEPSPEED")
        if resume:
            self.load_latest_checkpoint()

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        r, acc = self.recipe, self.accelerator
        self.plans = plan_stages(r, acc.num_processes)
        #: the step at which each teacher first trains (its target statistics are estimated then)
        self.first_steps = {t: min(p.start_step for p in self.plans if t in p.teachers)
                            for t in {t for p in self.plans for t in p.teachers}}
        torch.manual_seed(r.train.seed)
        all_teachers = [t for t in r.teachers if any(t in p.teachers for p in self.plans)]
        # (teacher, group resolution override or None, upsampled) for every slot this rank runs
        mine = {slot.teacher_key(t) for p in self.plans for slot in p.rank_slots[acc.process_index]
                for t in slot.teachers}
        self.cache, self.cached = setup.open_cache(r, all_teachers)
        check_mosaic_cache(self.plans, self.cached)
        with lifecycle.phase("preparing the teachers' artefacts (radio_prepare hooks)"):
            self.registry.hook.radio_prepare(recipe=r, teachers=[t for t in all_teachers if t not in self.cached])
        dims: dict[str, tuple[Optional[int], int]] = {}
        for name in all_teachers:
            if name in self.cached:
                if any(key[0] == name and key[2] for key in mine):
                    raise RecipeError(f"teachers.{name}.upsampler: the teacher is read from the feature cache, which "
                                     "holds its plain features; leave it out of cache.teachers or drop the upsampler")
                dims[name] = self.cache.dims(name)
                continue
            bases: dict = {}  # resolution -> the plain instance (an upsampled one wraps it: weights loaded once)
            built: dict = {}
            for key in sorted((k for k in mine if k[0] == name), key=lambda k: (k[1] or (0, 0), k[2])):
                _, res, upsampled = key
                if res not in bases:
                    bases[res] = build_teacher(r, name, self.registry, resolution=res)
                # wrapped before the cast: the upsampler's file is checked against the fp32 weights' fingerprint
                built[key] = with_upsampler(r, name, bases[res]) if upsampled else bases[res]
            for key, t in built.items():
                t = t.to(acc.device, setup.teacher_dtype(r, acc.device))
                if key == (name, None, False):
                    self.teachers[name] = t
                else:
                    self.teacher_variants[key] = t
                    self.teachers.setdefault(name, t)  # evaluation uses one instance per teacher
            if name not in self.teachers:  # another rank runs it; this rank only needs its dimensions
                t = build_teacher(r, name, self.registry, meta=True)
            dims[name] = (t.summary_dim, t.spatial_dim)
        torch.manual_seed(r.train.seed)  # same student/head init on every rank, whatever was built
        self._dims = dims
        distiller = build_distiller(r, dims, self.registry, losses=True, cached=self.cached)
        if r.student.init is not None:  # start from the released weights (a resume then loads its own)
            from ..formats.release import describe_reuse, forget_releases, load_release_weights

            load_release_weights(distiller, r)
            acc.print(describe_reuse(r))
            forget_releases()
        check_student_resolutions(self.plans, distiller.student.size_multiple, r.student.name, self.recipe_path)
        self.objective = Objective(r, self.registry, self.teachers, self.cached, acc)
        if r.train.channels_last:
            distiller = distiller.to(memory_format=torch.channels_last)
        optimizer = setup.build_optimizer(r, distiller, setup.use_fused(r, acc.device, self.sharded))
        if self.sharded:  # teachers stay out: only the student + heads are sharded
            setup.check_fsdp_wrap(r, distiller)
        self.distiller, self.optimizer = acc.prepare(distiller, optimizer)
        # MESA's EMA copy (made before compiling) and DAMP's weight noise; None when off
        self.mesa, self.damp = regularizers.build(r, self.unwrapped)
        self.objective.mesa = self.mesa
        self.checkpointer.attach(self.distiller, self.optimizer, self.sharded, r.train.fsdp.checkpoint == "full")
        if r.train.compile:  # in place, after MESA's copy: see radio_core.train.compiled
            shapes = {tuple(res) for p in self.plans for slot in p.rank_slots[acc.process_index]
                      for res in slot.student_resolution}
            compile_model(self.unwrapped, r.train.compile_dynamic, len(shapes))
        # Not prepared: Accelerate would step it once per process; ours steps once per optimiser
        # step. Its state goes into trainer_state.json (see train.checkpoint).
        self.scheduler = build_scheduler(optimizer, self.lr_multiplier)
        self.source = self.registry.build("dataset", r.data.source.name, **r.data.source.args)
        if self.cache is not None and r.cache.verify:
            crops = {tuple(self.crop_size(s)) for p in self.plans for s in p.rank_slots[acc.process_index]}
            setup.verify_cache(r, self.registry, self.cache, self.cached, self.source, crops)

    @property
    def unwrapped(self) -> Distiller:
        return self.accelerator.unwrap_model(self.distiller)

    @property
    def sharded(self) -> bool:
        """Student + heads sharded over the ranks (``train.fsdp``)."""
        return self.accelerator.distributed_type.value == "FSDP"

    def full_model(self) -> Optional[Distiller]:
        """The trained module with all its weights, on the main process (None elsewhere); every
        rank must call it (under FSDP it gathers the shards)."""
        return outputs.full_model(self)

    def lr_multiplier(self, step: int) -> float:
        sched = self.recipe.schedule
        plan = stage_at(self.plans, step) or self.plans[-1]
        if plan.restart_schedule:
            return lr_multiplier(step - plan.start_step, plan.steps, sched.warmup_steps, sched.min_lr_ratio,
                                 sched.name)
        return lr_multiplier(step, self.recipe.train.steps, sched.warmup_steps, sched.min_lr_ratio, sched.name)

    def crop_size(self, slot) -> tuple[int, int]:
        return stages.crop_size(self.recipe, slot, self.teachers, self.cache, self.cached, self.teacher_variants)

    def expected_number(self, step: int) -> int:
        return stages.expected_number(self.plans, step, self.recipe.train.grad_accum)

    def effective_batch(self, plan: Optional[StagePlan] = None) -> int:
        return stages.effective_batch(plan or self.stage or self.plans[0], self.recipe.train.grad_accum)

    def enter_stage(self, plan: StagePlan, step: int) -> list[SlotRuntime]:
        """Build this rank's slots for ``plan`` with loaders positioned at ``step``."""
        acc = self.accelerator
        self.stage = plan
        return stages.slot_runtimes(self.recipe, plan, acc.process_index, step, self.source, self.teachers,
                                    self.cache, self.cached, self._number_shift, acc.device.type == "cuda",
                                    self.teacher_variants)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        acc, r = self.accelerator, self.recipe
        lifecycle.resumable = None
        if acc.is_main_process:
            prepare_out_dir(self.out_dir, self.state.step, self._remove_outputs, acc.print, self._writes())
            (self.out_dir / "recipe.yaml").write_text(dump_recipe(r))
        acc.wait_for_everyone()
        logger = MetricsLogger(self.out_dir, r.logging, enabled=acc.is_main_process)
        sample_log = (open(self.out_dir / f"samples_rank{acc.process_index}.jsonl", "a")
                      if r.data.log_samples else None)
        self.signals.install()
        start = self.state.step
        acc.print(f"radio-distill: {acc.num_processes} process(es), steps {start}->{r.train.steps}, "
                  f"{self.cpu_threads} CPU thread(s) per process ({self._threads_why})\n"
                  + describe(self.plans, r.train.grad_accum))
        self.registry.hook.radio_train_start(trainer=self)
        progress = progress_bar(start, r.train.steps, enabled=acc.is_main_process and r.logging.progress)
        last: dict[str, float] = {}
        window = [time.perf_counter(), 0]  # start of the logging window, samples in it
        try:
            for plan in self.plans:
                if plan.end_step <= self.state.step:
                    continue
                runtimes = self.enter_stage(plan, self.state.step)
                self.objective.estimate_target_norms(self.unwrapped, runtimes, plan, self.source)
                for step in range(self.state.step, plan.end_step):
                    lifecycle.heartbeat()
                    if r.train.target_norm_steps:
                        self.objective.reestimate_target_norms(self.unwrapped, runtimes, plan, self.source, step,
                                                               self.first_steps)
                    work = [(rt, next(rt.iterator)) for _ in range(r.train.grad_accum) for rt in runtimes]
                    self.bad_images.count([b for _, b in work])
                    if sample_log is not None:
                        self._log_samples(sample_log, step, work)
                    terms = self.train_step(work, step)
                    self._advance(plan, step)
                    window[1] += self.effective_batch(plan)
                    metrics = self._maybe_log(logger, terms, plan, step, start, window)
                    if metrics:
                        last = metrics
                        progress.set_postfix(loss=f"{metrics['loss/total']:.4f}",
                                             img_s=f"{metrics['images_per_s']:.1f}")
                    progress.update(1)
                    if metrics:
                        progress.line()  # not a terminal: one line per logging step
                    self.registry.hook.radio_step_end(trainer=self, step=self.state.step, metrics=metrics)
                    # Every rank takes the same branches below (the stop flag is reduced), so the
                    # collectives inside stay matched.
                    stop = self.signals.requested_anywhere(acc)
                    s = self.state.step
                    if s % r.checkpoint.every == 0 or s == r.train.steps or stop or s == plan.end_step:
                        self.guard.drain()  # exact counters in the checkpoint
                        if not metrics:
                            self._sync_bad_images()
                        if s == r.train.steps:
                            self.check_learned()  # before the last checkpoint: a run that learned nothing ends here
                        with lifecycle.phase(f"writing checkpoint step {s}"):
                            self.save_checkpoint()
                    if stop:
                        acc.print(f"stop requested: checkpoint written at step {s}; resume with --resume")
                        self.stopped = True
                        return last
        finally:
            progress.close()
            logger.close()
            if sample_log is not None:
                sample_log.close()
            self.signals.restore()
        if self.state.step == r.train.steps:
            self.check_learned()  # (a resumed run that was complete: checked again)
            lifecycle.resumable = (f"the last checkpoint (step {self.state.step}) is complete: --resume writes what "
                                   "is missing (report, export)")
        # (a stop from here on is reported as resumable: the exception carries no state of ours)
        if self.state.step == r.train.steps and r.eval.report:
            with lifecycle.phase("writing the report"):
                self.write_report()
        if self.state.step == r.train.steps and r.checkpoint.export:  # after the report: its card cites it
            with lifecycle.phase("writing the export"):
                self.export(self.out_dir / "export")
        with lifecycle.phase("the plugins' radio_train_end hooks"):
            self.registry.hook.radio_train_end(trainer=self)
        lifecycle.resumable = None
        self.release_run_folder()
        return last

    def check_learned(self) -> None:
        """NotTrainedError (on every rank) when no step of the run had a finite, non-zero
        objective: every loss was NaN/inf (a run shorter than the non-finite guard) or exactly 0."""
        acc = self.accelerator
        self.guard.drain()
        learned = torch.tensor([float(self.state.learned_steps)], device=acc.device)
        if acc.num_processes > 1:
            learned = acc.reduce(learned, "max")
        if float(learned.item()) == 0:
            raise NotTrainedError(
                f"the run ended at step {self.state.step} without learning: no step had a finite, non-zero objective "
                f"({self.state.skipped_steps} skipped as non-finite, the others 0); no checkpoint, report or export "
                "was written for its last step. Check the teachers' weights and outputs, the loss weights and optim.lr")

    def _writes(self) -> tuple[str, ...]:
        """What this run writes at the top of its folder (recorded in its manifest up front)."""
        r = self.recipe
        names = ["recipe.yaml"] + ["metrics.jsonl"] * r.logging.jsonl + ["tensorboard"] * r.logging.tensorboard
        names += ["report"] * r.eval.report + ["export"] * r.checkpoint.export
        names += [f"samples_rank{i}.jsonl" for i in range(self.accelerator.num_processes) if r.data.log_samples]
        return tuple(names)

    def release_run_folder(self) -> None:
        """Let go of the output folder's lock (``close`` does; idempotent)."""
        if self._locked:
            self._locked = False
            unlock_run_folder(self.out_dir)

    def train_step(self, work: list[tuple[SlotRuntime, dict]], step: int) -> dict[str, Tensor]:
        """One optimiser step over this rank's (slot, batch) pairs (all micro-steps). Nothing in
        it waits for the device (see ``radio_core.train.guard``) unless the optimiser cannot skip
        a non-finite step by itself."""
        acc, r = self.accelerator, self.recipe
        if not self.distiller.training:  # (evaluation puts it back; a recursive .train() costs ~1 us per module)
            self.distiller.train()
        micro = r.train.grad_accum
        per_micro = max(1, len(work) // micro)
        collected: dict[str, list[Tensor]] = {}
        for k, (rt, batch) in enumerate(work):
            last = k == len(work) - 1
            # Reseeded per (step, slot, micro-step): student-side randomness is independent of
            # history (exact resume) and of the rank (the same samples get the same randomness
            # however the groups are laid out over processes).
            micro_step = k // per_micro
            seed = _mix(r.train.seed, step, rt.slot.offset, micro_step)
            torch.manual_seed(seed)
            random.seed(seed)
            noise = (self.damp.perturbed(step, rt.slot.offset, micro_step) if self.damp is not None
                     else contextlib.nullcontext())  # DAMP: this micro-step runs on perturbed weights
            with noise, (contextlib.nullcontext() if last else acc.no_sync(self.distiller)):
                terms = self.objective.forward_losses(self.distiller, self.unwrapped, rt, batch, step, self.stage)
                loss = terms["total"] if micro == 1 else terms["total"] / micro
                if self._plain_backward:
                    loss.backward()
                else:
                    acc.backward(loss)
            for key, v in terms.items():
                collected.setdefault(key, []).append(v.detach())
        summed = {k: v[0] if len(v) == 1 else torch.stack(v).mean() for k, v in collected.items()}
        if len(work) != micro:
            summed["total"] = summed["total"] * len(work) / micro  # the step's objective on this rank
        nonfinite = self.guard.nonfinite(summed["total"])
        on_device = self.guard.skip and guard.skips_on_device(self.optimizer, acc)
        if on_device:
            guard.raw_optimizer(self.optimizer).found_inf = nonfinite  # fused AdamW: a no-op step when set
            apply = True
        else:  # one host sync: this optimiser must not be called on a non-finite step
            apply = not (self.guard.skip and bool(nonfinite))
        if apply:
            if r.train.grad_clip:
                summed["grad_norm"] = acc.clip_grad_norm_(self.distiller.parameters(), r.train.grad_clip)
            self.optimizer.step()
            if self.mesa is not None:  # MESA: the EMA follows the updated weights (not a skipped step's)
                self.mesa.update(applied=1 - nonfinite if on_device else None)
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.record(step, summed, nonfinite, self.unwrapped.last_output_finite)
        self.guard.drain(keep=1 if on_device else 0)  # the previous step's record: long on the host by now
        summed["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        return summed

    # ------------------------------------------------------------------ loop helpers
    def _advance(self, plan: StagePlan, step: int) -> None:
        self.state.step = step + 1
        self.state.next_number = self.expected_number(step + 1) + self._number_shift
        self.state.world_size = self.accelerator.num_processes
        self.state.samples_seen += self.effective_batch(plan)

    def _maybe_log(self, logger: MetricsLogger, terms: dict[str, Tensor], plan: StagePlan, step: int, start: int,
                   window: list) -> dict[str, float]:
        """Reduce, evaluate and log on logging steps (every rank computes the same condition)."""
        r, s = self.recipe, self.state.step
        evaluate = bool(r.eval.every) and s % r.eval.every == 0
        if not (s % r.train.log_every == 0 or s == r.train.steps or step == start or evaluate):
            return {}
        self.guard.drain()
        self._sync_bad_images()
        elapsed = time.perf_counter() - window[0]
        metrics = reduce_losses(self.accelerator, terms, self.stage.teachers)
        metrics.update(images_per_s=window[1] / max(elapsed, 1e-9), samples=self.state.samples_seen,
                       bad_images=self.state.bad_images, stage=plan.index)
        if evaluate:
            metrics.update(self.evaluate_fidelity())
        window[0], window[1] = time.perf_counter(), 0
        logger.log(s, metrics)
        return metrics

    def _sync_bad_images(self) -> None:
        self.state.bad_images = self.bad_images.total()
        self.bad_images.check(self.state.bad_images, self.state.samples_seen, self.recipe.data.max_bad_fraction,
                              self.state.step)

    def _log_samples(self, sample_log: Any, step: int, work: list) -> None:
        keys = [self.source.key(int(i)) for _, b in work for i in b["index"]]
        sample_log.write(json.dumps({"step": step, "keys": keys}) + "\n")
        sample_log.flush()

    # ------------------------------------------------------------------ outputs (train.outputs)
    def evaluate_fidelity(self) -> dict[str, float]:
        return outputs.evaluate_fidelity(self)

    def write_report(self) -> Optional[Path]:
        return outputs.write_report(self)

    def export(self, path: Path) -> Path:
        return outputs.export(self, path)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        def saved(path: Path) -> None:
            self.registry.hook.radio_checkpoint_saved(trainer=self, path=str(path))

        return self.checkpointer.save(self.state, self.scheduler, self.recipe.train.steps, on_saved=saved,
                                      extra=self.mesa.save if self.mesa is not None else None)

    def load_latest_checkpoint(self) -> Optional[Path]:
        """Load the newest loadable checkpoint; a corrupt one is reported and the previous used;
        ResumeError (nothing changed on disk) when there are checkpoints and none loads."""
        acc = self.accelerator
        found = self.checkpointer.load_latest(self.state, self.scheduler, self.recipe.train.steps,
                                              extra=self.mesa.load if self.mesa is not None else None)
        if found is None:
            acc.print(f"no checkpoint under {self.ckpt_dir}; starting from step 0")
            return None
        path, saved = found
        self.bad_images.base = self.state.bad_images
        expected = self.expected_number(self.state.step)
        if saved["trainer"].get("world_size", acc.num_processes) != acc.num_processes:
            # Continue the global sample numbering where the old world size left it.
            self._number_shift = self.state.next_number - expected
            acc.print(f"world size changed {saved['trainer']['world_size']} -> {acc.num_processes}: "
                      f"continuing at sample {self.state.next_number}")
        acc.print(f"resumed from {path} (step {self.state.step})")
        return path

    def request_stop(self) -> None:
        """Checkpoint after the step in flight and return from ``fit`` (what SIGTERM does)."""
        self.signals.request()

    def close(self, clean: bool = True) -> None:
        """Destroy the process group before the interpreter exits. Left to interpreter teardown,
        gloo's worker threads can outlive the Python objects they hold and abort the process
        (SIGABRT, "terminate called without an active exception") after the run has finished.
        ``clean``: every rank got here the same way, so a barrier first lets the last collective
        drain; after an error the peers may be anywhere, so the group is dropped without one."""
        acc = self.accelerator
        try:
            if clean and acc.num_processes > 1:
                acc.wait_for_everyone()
            acc.end_training()
        finally:
            self.release_run_folder()
