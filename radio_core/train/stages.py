"""Entering a stage: this rank's slots (teacher group + batch size + resolution), each with its
teachers grouped by input size and a data loader positioned at the resume step."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..data.augment import AugmentedImages, collate, loader_worker_init
from ..data.sampling import StepBatchSampler, sampling_kwargs
from ..models import preprocess
from ..models.teachers import TeacherGroup, group_teachers
from ..plan.partition import Slot, StagePlan, stage_at
from ..protocols import Teacher
from ..recipe import Recipe


@dataclass
class SlotRuntime:
    """What a rank needs to run one slot: its teachers grouped by input size, and its data."""

    slot: Slot
    resize_sets: list[TeacherGroup]
    dataset: AugmentedImages
    iterator: Any = None
    #: the live teacher instances of this slot (a group may run a teacher at its own resolution)
    teachers: dict[str, Teacher] = field(default_factory=dict)


def slot_teachers(slot: Slot, teachers: dict[str, Teacher], variants: dict | None = None) -> dict[str, Teacher]:
    """The instance of each of ``slot``'s teachers: ``variants[slot.teacher_key(name)]`` where the
    group runs its own (another resolution, or upsampled by FeatSharp), else the recipe's
    (``teachers[name]``)."""
    variants = variants or {}
    out = {}
    for t in slot.teachers:
        key = slot.teacher_key(t)
        if key in variants:
            out[t] = variants[key]
        elif t in teachers:
            out[t] = teachers[t]
    return out


def crop_size(recipe: Recipe, slot: Slot, teachers: dict[str, Teacher], cache: Any,
              cached: set[str], variants: dict | None = None) -> tuple[int, int]:
    """The crop every model's input of this slot is resized from."""
    if recipe.data.crop_size:
        return tuple(recipe.data.crop_size)
    if cache is not None and any(t in cached for t in slot.teachers):
        return tuple(cache.index["augment"]["crop_size"])
    live = slot_teachers(slot, teachers, variants)
    return preprocess.covering_size([live[t].input_size for t in slot.teachers], slot.student_resolution)


def expected_number(plans: list[StagePlan], step: int, grad_accum: int) -> int:
    """Global number of the first sample of ``step`` under this run's plan."""
    plan = stage_at(plans, step)
    if plan is None:
        last = plans[-1]
        return last.number_base + last.steps * grad_accum * last.consumption
    return plan.number_base + (step - plan.start_step) * grad_accum * plan.consumption


def slot_runtimes(recipe: Recipe, plan: StagePlan, rank: int, step: int, source: Any,
                  teachers: dict[str, Teacher], cache: Any, cached: set[str], number_shift: int,
                  pin_memory: bool, variants: dict | None = None) -> list[SlotRuntime]:
    """This rank's slots for ``plan`` with loaders positioned at ``step``."""
    micro = recipe.train.grad_accum
    workers = recipe.data.num_workers
    out = []
    for slot in plan.rank_slots[rank]:
        live = {t: m for t, m in slot_teachers(slot, teachers, variants).items() if t not in cached}
        uses_cache = any(t in cached for t in slot.teachers)
        dataset = AugmentedImages(source, crop_size(recipe, slot, teachers, cache, cached, variants), recipe.augment.scale,
                                  recipe.augment.ratio, recipe.augment.hflip, cache=cache if uses_cache else None)
        views = cache.views if cache is not None else recipe.augment.views
        sampler = StepBatchSampler(len(source), slot.batch_size, recipe.train.seed, offset=slot.offset,
                                   stride=plan.consumption, base=plan.number_base,
                                   start=(step - plan.start_step) * micro, stop=plan.steps * micro, views=views,
                                   **sampling_kwargs(source))
        sampler.base += number_shift
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=pin_memory, prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=loader_worker_init if workers > 0 else None)
        batches = iter(loader)
        if workers == 0 and recipe.data.prefetch > 0:
            batches = Prefetcher(batches, recipe.data.prefetch)
        out.append(SlotRuntime(slot, group_teachers(live), dataset, batches, live))
    return out


class Prefetcher:
    """Iterates ``batches`` in a background thread, ``depth`` batches ahead of the consumer.

    Decoding (PIL) and the copies out of the feature cache's memory maps release the GIL, so
    they overlap the training step. The order is the iterator's own (resume stays exact); an
    exception in the thread is re-raised by ``next``. The thread holds no reference to this
    object: when the runtime is dropped, ``__del__`` stops it."""

    _END = object()

    def __init__(self, batches: Iterator, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        threading.Thread(target=_fill, args=(batches, self._queue, self._stop, self._END), daemon=True,
                         name="radio-prefetch").start()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.exc
        return item

    def close(self) -> None:
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _fill(batches: Iterator, q: queue.Queue, stop: threading.Event, end: object) -> None:
    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for batch in batches:
            if not put(batch):
                return
        put(end)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
        put(_Raised(exc))


def effective_batch(plan: StagePlan, grad_accum: int) -> int:
    return plan.consumption * grad_accum


__all__ = ["Prefetcher", "SlotRuntime", "slot_teachers", "crop_size", "expected_number", "slot_runtimes",
           "effective_batch"]
