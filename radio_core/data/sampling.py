"""Deterministic, resumable sampling.

Sampling is a pure function of (seed, global sample number): the sample number ``g`` picks an
epoch (``g // len``), a position in that epoch's seeded permutation, and the seed of the
image's augmentation. A run resumed at step ``k`` therefore sees exactly the images (and
crops) the uninterrupted run would have, whatever the number of loader workers.

Sources stored as shards opt in to block shuffling (shards permuted, then members within a
few shards at a time), which needs memory per shard, not per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .sources import ImageSource


def _mix(*values: int) -> int:
    """A deterministic 63-bit hash of integers (SplitMix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class SampleRef:
    """One sample of the stream: which image, and the seed of its augmentation."""

    number: int  # global sample number
    index: int
    aug_seed: int
    #: with a fixed number of views per image (teacher-feature caches): which view, else -1.
    view: int = -1


def view_seed(seed: int, index: int, view: int) -> int:
    """Augmentation seed of fixed view ``view`` of image ``index``."""
    return _mix(seed, index, view, 0xCAC4E)


class SampleStream:
    """Maps global sample numbers to (image index, augmentation seed), epoch by epoch.

    Two shuffles, both seeded permutations of the whole dataset per epoch:

    * global (default): ``torch.randperm(len)`` per epoch, 8 bytes per sample in memory;
    * block (``shard_sizes`` given, from sources stored as shards): shards are permuted, taken
      ``block_shards`` at a time, and the members of each block permuted. Memory is O(shards),
      and consecutive sample numbers (a step's batch on every rank) read from one block, so
      reads stay within a few files.
    """

    def __init__(self, length: int, seed: int, views: Optional[int] = None,
                 shard_sizes: Optional[Sequence[int]] = None, block_shards: int = 1) -> None:
        if length <= 0:
            raise ValueError("dataset is empty")
        self.length, self.seed, self.views = length, seed, views
        self._perm_epoch, self._perm = -1, None
        self.shard_sizes = None
        if shard_sizes is not None:
            sizes = np.asarray(shard_sizes, dtype=np.int64)
            if sizes.ndim != 1 or sizes.size == 0 or (sizes <= 0).any() or int(sizes.sum()) != length:
                raise ValueError(f"shard_sizes must be positive and sum to the dataset length {length} "
                                 f"(got {sizes.size} shards summing to {int(sizes.sum())})")
            if block_shards < 1:
                raise ValueError(f"block_shards must be >= 1, got {block_shards}")
            self.shard_sizes, self.block_shards = sizes, int(block_shards)
            self._shard_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            self._blocks: dict[int, np.ndarray] = {}

    def __call__(self, number: int) -> SampleRef:
        epoch, pos = divmod(number, self.length)
        index = self._global_index(epoch, pos) if self.shard_sizes is None else self._block_index(epoch, pos)
        if self.views:
            # K fixed augmentations per image: the crop depends on (image, view) only, so a
            # teacher-feature cache computed for these seeds matches online teachers exactly.
            view = _mix(self.seed, number, 0x71E) % self.views
            return SampleRef(number, index, view_seed(self.seed, index, view), view)
        return SampleRef(number, index, _mix(self.seed, number, 0xA06))

    def _global_index(self, epoch: int, pos: int) -> int:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0xDA7A))
            self._perm, self._perm_epoch = torch.randperm(self.length, generator=g), epoch
        return int(self._perm[pos])

    def _block_index(self, epoch: int, pos: int) -> int:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0xB10C))
            order = torch.randperm(len(self.shard_sizes), generator=g).numpy()
            block_ends = np.cumsum(np.add.reduceat(self.shard_sizes[order],
                                                   np.arange(0, len(order), self.block_shards)))
            self._perm, self._perm_epoch = (order, block_ends), epoch
            self._blocks.clear()
        order, block_ends = self._perm
        block = int(np.searchsorted(block_ends, pos, side="right"))
        local = pos - (int(block_ends[block - 1]) if block else 0)
        members = self._blocks.get(block)
        if members is None:
            shards = order[block * self.block_shards:(block + 1) * self.block_shards]
            members = np.concatenate([np.arange(self._shard_starts[s], self._shard_starts[s] + self.shard_sizes[s])
                                      for s in shards])
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, block, 0xB10C))
            members = members[torch.randperm(len(members), generator=g).numpy()]
            if len(self._blocks) >= 4:  # a batch spans at most a couple of blocks
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[block] = members
        return int(members[local])


def sampling_kwargs(source: ImageSource) -> dict:
    """What the sampler needs from a source beyond its length: a source stored as shards opts
    in to block shuffling by exposing ``shard_sizes`` (and optionally ``block_shards``)."""
    sizes = getattr(source, "shard_sizes", None)
    if sizes is None:
        return {}
    # an array, not a list: at a million shards a list of Python ints costs ~40 MB per copy
    return {"shard_sizes": np.asarray(sizes, dtype=np.int64), "block_shards": int(getattr(source, "block_shards", 1))}


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for each micro-step from ``start`` to ``stop``, this rank's list of SampleRefs.

    Sample numbers of micro-step ``s`` are ``base + s * stride + offset + j`` for j < batch_size.
    By default ``stride = world_size * batch_size`` and ``offset = rank * batch_size``; the trainer
    passes explicit values when ranks draw different batch sizes (teacher groups) and ``base``
    to continue the numbering across training stages. ``shard_sizes``/``block_shards`` select
    block shuffling (see ``SampleStream``; ``sampling_kwargs(source)`` gives them).
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, stop: Optional[int] = None, offset: Optional[int] = None,
                 stride: Optional[int] = None, base: int = 0, views: Optional[int] = None,
                 shard_sizes: Optional[Sequence[int]] = None, block_shards: int = 1) -> None:
        self.stream = SampleStream(length, seed, views, shard_sizes, block_shards)
        self.batch_size = batch_size
        self.offset = rank * batch_size if offset is None else offset
        self.stride = world_size * batch_size if stride is None else stride
        self.base, self.start, self.stop = base, start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) if self.stop is not None else 2**62

    def refs(self, step: int) -> list[SampleRef]:
        first = self.base + step * self.stride + self.offset
        return [self.stream(first + j) for j in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[SampleRef]]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.refs(step)
            step += 1
