"""Sampling at scale: block shuffle over shards (a pure function of seed and sample number),
loader workers that survive a launcher's stop signal, and a 2-rank train / stop / resume run
from tar shards that must see exactly the images of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fake_distribution, install_example_plugin

from radio_core.data.augment import AugmentedImages, collate, loader_worker_init
from radio_core.data.sampling import SampleStream, StepBatchSampler, sampling_kwargs
from radio_core.data.shards import TarShardSource, pack_folder, read_shard_index
from radio_core.data.sources import SkimageSamplesSource

REPO = Path(__file__).resolve().parents[1]
SIZES = [7, 5, 9, 3, 6, 4, 8]  # uneven shards, as a last shard always is


def shard_of(index: int, sizes=SIZES) -> int:
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


def epoch_indices(stream: SampleStream, epoch: int) -> list[int]:
    n = stream.length
    return [stream(epoch * n + p).index for p in range(n)]


@pytest.mark.parametrize("block_shards", [1, 2, 3])
def test_block_shuffle_epochs_are_permutations_read_block_by_block(block_shards):
    n = sum(SIZES)
    stream = SampleStream(n, seed=11, shard_sizes=SIZES, block_shards=block_shards)
    epochs = [epoch_indices(stream, e) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
        # Consecutive numbers stay in one block: between a shard's first and last member only
        # the `block_shards` shards of its block are read.
        shards = np.array([shard_of(i) for i in order])
        for s in range(len(SIZES)):
            where = np.flatnonzero(shards == s)
            assert len(set(shards[where[0]:where[-1] + 1])) <= block_shards
    if block_shards == 1:
        for order in epochs:
            shards = [shard_of(i) for i in order]
            changes = sum(a != b for a, b in zip(shards, shards[1:]))
            assert changes == len(SIZES) - 1  # one contiguous run per shard
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every epoch
    assert epochs[0] != sorted(epochs[0])  # members shuffled within shards, not read in file order


def test_block_shuffle_is_a_pure_function_of_seed_and_number():
    n = sum(SIZES)
    numbers = list(range(5 * n))
    sequential = SampleStream(n, seed=3, shard_sizes=SIZES, block_shards=2)
    expected = [sequential(k) for k in numbers]
    rng = np.random.default_rng(0)
    shuffled = SampleStream(n, seed=3, shard_sizes=SIZES, block_shards=2)
    for k in rng.permutation(numbers):  # any access order, across epochs and blocks
        assert shuffled(int(k)) == expected[k]
    assert [r.index for r in expected] != [SampleStream(n, 4, shard_sizes=SIZES, block_shards=2)(k).index
                                           for k in numbers]
    # the global shuffle of sources without shard sizes is unchanged
    assert [SampleStream(n, 3)(k).index for k in numbers[:n]] != [r.index for r in expected[:n]]
    with pytest.raises(ValueError, match="sum to the dataset length"):
        SampleStream(n + 1, 0, shard_sizes=SIZES)


def test_block_shuffle_scales_to_a_billion_samples():
    """DataComp-1B in 1000-image shards: a far position is found without per-sample memory."""
    t0 = time.perf_counter()
    stream = SampleStream(10**9, seed=0, shard_sizes=[1000] * 10**6, block_shards=4)
    far = 614_000_000 + 3 * 10**9  # fourth epoch
    refs = [stream(far + j) for j in range(64)]
    assert time.perf_counter() - t0 < 5
    assert all(0 <= r.index < 10**9 for r in refs) and len({r.index for r in refs}) == 64
    assert len({r.index // 1000 for r in refs}) <= 4  # one block: reads from at most 4 shards
    assert stream._perm[0].nbytes <= 8 * 10**6  # O(shards), not the 8 GB of randperm(1e9)


def test_shard_source_opts_in_and_each_step_reads_few_shards(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i in range(40):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i:03d}.png")
    pack_folder(str(folder), str(tmp_path / "s"), shard_size=5, progress=False)
    src = TarShardSource(str(tmp_path / "s"), block_shards=2)
    kwargs = sampling_kwargs(src)
    assert list(kwargs["shard_sizes"]) == [5] * 8 and kwargs["block_shards"] == 2
    assert sampling_kwargs(TarShardSource(str(tmp_path / "s"), shuffle="global")) == {}
    assert sampling_kwargs(SkimageSamplesSource(names=["astronaut"])) == {}
    world, batch = 2, 2
    samplers = [StepBatchSampler(len(src), batch, seed=0, rank=r, world_size=world, **kwargs) for r in range(world)]
    for step in range(30):
        indices = [ref.index for s in samplers for ref in s.refs(step)]
        shards = {src.shard_path(i) for i in indices}
        assert len(shards) <= 2 * 2  # a step spans at most two blocks of two shards


def test_loader_workers_survive_a_stop_signal_to_their_group():
    """torchrun and Ctrl-C signal whole process groups; the training process must stay the one
    that decides to stop (and checkpoint) instead of failing on a dead decoding worker."""
    ds = AugmentedImages(SkimageSamplesSource(names=["astronaut", "coffee"]), (16, 16))
    sampler = StepBatchSampler(len(ds), batch_size=2, seed=0, stop=6)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=1,
                                         worker_init_fn=loader_worker_init, persistent_workers=True)
    it = iter(loader)
    next(it)
    for w in it._workers:
        os.kill(w.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert len(list(it)) == 5


# ---------------------------------------------------------------------------------------
# 2 ranks, tar shards, stop and resume


STUDENT_PLUGIN = '''
import os, signal
import torch
from torch import nn
from radio_core import hookimpl
from radio_core.protocols import Student, StudentOutput


class TinyStudent(Student):
    """Patch conv + one residual MLP; enough to train a few steps on CPU."""

    def __init__(self, embed_dim=32, patch_size=8, num_cls_tokens=1):
        super().__init__()
        self.embed_dim, self.patch_size, self.num_cls_tokens = embed_dim, patch_size, num_cls_tokens
        self.embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls = nn.Parameter(torch.zeros(1, num_cls_tokens, embed_dim))
        self.mix = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim))

    def forward(self, x):
        p = self.embed(x)
        b, _, h, w = p.shape
        t = torch.cat([self.cls.expand(b, -1, -1), p.flatten(2).transpose(1, 2)], 1)
        t = t + self.mix(t)
        n = self.num_cls_tokens
        return StudentOutput(t[:, :n], t[:, n:], (h, w))


def build_tiny(embed_dim=32, patch_size=8, num_cls_tokens=1):
    """A tiny patch-conv student for tests."""
    return TinyStudent(embed_dim, patch_size, num_cls_tokens)


@hookimpl
def radio_register(registry):
    registry.add("student", "tiny_test_student", build_tiny)


@hookimpl
def radio_step_end(trainer, step, metrics):
    # A real SIGTERM to one rank's process after a chosen step (what a scheduler's preemption
    # sends): the trainer must checkpoint on every rank and exit.
    at = os.environ.get("TEST_SIGTERM_AT_STEP")
    if at and int(at) == step and trainer.accelerator.process_index == int(os.environ["TEST_SIGTERM_RANK"]):
        os.kill(os.getpid(), signal.SIGTERM)
'''


def install_plugins(root: Path) -> list[str]:
    """The example third-party teacher (pip-installed) and a tiny student in a dist-info, both
    found through the radio_core entry-point group like any installed plugin."""
    site = install_example_plugin(root)
    plug = fake_distribution(root / "plug", "tiny-test-student", "tiny_test_student", STUDENT_PLUGIN)
    return [str(site), str(plug)]


def torchrun(recipe: Path, paths: list[str], *args: str, env: dict | None = None, stopped: bool = False) -> str:
    """Two ranks under torchrun. ``stopped``: the run is stopped by a signal, and its ranks exit
    with the documented status 75, which torchrun reports as a failed child."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]), **(env or {})}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "radio_core.run", str(recipe), *args], env=env, capture_output=True, text=True,
                         timeout=180)
    if stopped:
        assert res.returncode != 0 and "exitcode  : 75" in res.stderr, (res.stdout + res.stderr)[-4000:]
    else:
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout


def seen(run: Path, rank: int) -> dict[int, list[str]]:
    lines = [json.loads(l) for l in (run / f"samples_rank{rank}.jsonl").read_text().splitlines()]
    steps = [l["step"] for l in lines]
    assert len(steps) == len(set(steps)), f"rank {rank} logged a step twice: {steps}"
    return {l["step"]: l["keys"] for l in lines}


def corrupt(shard_dir: Path, key: str) -> None:
    """Overwrite a member's bytes in place (tar structure intact)."""
    m = json.loads((shard_dir / "manifest.json").read_text())
    for shard in m["shards"]:
        for k, _ext, offset, size, *_ in read_shard_index(shard_dir / shard["name"]):
            if k == key:
                with open(shard_dir / shard["name"], "r+b") as f:
                    f.seek(offset)
                    f.write(b"\xff" * size)
                return
    raise KeyError(key)


@pytest.mark.slow
def test_two_ranks_stop_and_resume_see_the_same_images_from_shards(tmp_path):
    photos = SkimageSamplesSource()
    folder = tmp_path / "photos"
    for i in range(len(photos)):
        path = folder / (photos.key(i).replace(".", "_") + (".jpg" if i % 2 else ".png"))
        path.parent.mkdir(parents=True, exist_ok=True)
        photos.load(i).resize((64, 48)).save(path)  # small files: decoding is not what is tested
    shards = tmp_path / "shards"
    pack_folder(str(folder), str(shards), shard_size=4, progress=False)

    seed, batch, world, steps = 5, 2, 2, 6
    # Two corrupt members: the first image rank 0 draws under either shuffle (the trainer may
    # sample globally or block by block), so rank 0's bad-image count is never zero.
    src = TarShardSource(str(shards))
    bad = {src.key(StepBatchSampler(len(src), batch, seed, rank=0, world_size=world, **kw).refs(0)[0].index)
           for kw in ({}, sampling_kwargs(src))}
    for key in bad:
        corrupt(shards, key)

    paths = install_plugins(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "student": {"name": "tiny_test_student", "args": {"embed_dim": 32, "patch_size": 8}, "resolution": 32},
        "teachers": {"vit": {"plugin": "timm_vit",
                             "args": {"model": "vit_tiny_patch16_224", "img_size": 32, "depth": 1}}},
        "data": {"source": {"name": "webdataset", "args": {"shards": str(shards)}}, "batch_size": batch,
                 "num_workers": 1, "log_samples": True},
        "train": {"steps": steps, "log_every": 1, "seed": seed},
        "checkpoint": {"every": 100, "export": False},
        "logging": {"tensorboard": False, "progress": False},
    }))
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(recipe, paths, f"output_dir={full}")
    out = torchrun(recipe, paths, f"output_dir={split}", env={"TEST_SIGTERM_AT_STEP": "3", "TEST_SIGTERM_RANK": "1"},
                   stopped=True)
    assert "stop requested: checkpoint written at step 3" in out
    assert [p.name for p in (split / "checkpoints").iterdir()] == ["step_00000003"]
    assert len(seen(split, 0)) == 3
    torchrun(recipe, paths, f"output_dir={split}", "--resume")

    for rank in range(world):
        expected, got = seen(full, rank), seen(split, rank)
        assert sorted(expected) == list(range(steps))
        assert got == expected, f"rank {rank}"
    ranks = [seen(full, r) for r in range(world)]
    epoch_steps = len(src) // (world * batch)  # within the first epoch no image repeats, on any rank
    first_epoch = [k for step in range(epoch_steps) for r in ranks for k in r[step]]
    assert len(set(first_epoch)) == len(first_epoch) == epoch_steps * world * batch

    # Corrupt members were drawn, skipped and counted over all ranks; training went on.
    metrics = [json.loads(l) for l in (split / "metrics.jsonl").read_text().splitlines()]
    final = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()][-1]
    drawn = sum(k in bad for r in ranks for keys in r.values() for k in keys)
    assert drawn >= 1
    assert final["bad_images"] == metrics[-1]["bad_images"] == drawn
    # Exact resume of the model too: the last step's loss matches the uninterrupted run's.
    assert metrics[-1]["step"] == final["step"] == steps
    assert metrics[-1]["loss/total"] == pytest.approx(final["loss/total"], rel=1e-5)
