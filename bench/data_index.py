"""Data layer at scale: per-rank memory and start-up time against dataset size, the per-shard
index side by side with the earlier all-in-memory index, and the extrapolation to DataComp-1B.

    nice -n 10 python bench/data_index.py            # 1e5, 1e6 real tars; 1e7 index files; 1.4e9 table
    python bench/data_index.py --quick               # 1e4 real, 1e5 index files; < 1 min

What is real at each size (``kind`` column):

* ``tars``: N generated 8x8 PPM images (203 bytes each, seeded random pixels) written into real
  webdataset tar shards by ``webdataset.TarWriter``, then indexed by ``radio_core.data.shards.index_shards``
  (real header scans, real per-shard index files, real ``shard_table.npz``). The measured run
  opens the shards and reads the bytes of its batch.
* ``index``: the per-shard index files and the table are written by ``write_synthetic`` from tar
  arithmetic (512-byte header, data padded to 512, archive padded to 10240 bytes), no tar files.
  On the ``tars`` sizes the bench checks that this arithmetic gives exactly the scanned indexes
  and shard sizes, so the files are the ones ``index`` would write. The run reads no image bytes.
* ``table``: 1.4e9 samples in 1.4e6 shards of 1000: the real table, index files written only for
  the shards the measured step reads (the only ones a rank opens at start-up).

Each measurement runs in a fresh interpreter: rank 63 of 64, resumed far into the epoch (step
``--step``), builds the source and the sampler, draws its batch and resolves the batch's keys
(and bytes). ``start-up`` is that wall time; ``peak`` is tracemalloc's peak of Python + numpy
allocations during it (a second run; tracemalloc slows it), ``RSS`` the growth of the resident
set over the interpreter with imports done. ``legacy`` is what the earlier reader held: every
sample's key in a Python list plus offset, size and shard arrays, built from the same index files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADER, BLOCK, RECORD = 512, 512, 10240
PPM_SIDE = 8
PPM_BYTES = len(f"P6\n{PPM_SIDE} {PPM_SIDE}\n255\n".encode()) + 3 * PPM_SIDE * PPM_SIDE
WORLD, RANK, BATCH = 64, 63, 32


def key_of(i: int) -> str:
    return f"{i:010d}"


def synthetic_members(first: int, count: int) -> list[list]:
    """The index ``scan_tar`` finds in a TarWriter shard of ``count`` one-member PPM samples."""
    stride = HEADER + -(-PPM_BYTES // BLOCK) * BLOCK
    return [[key_of(first + j), "ppm", j * stride + HEADER, PPM_BYTES] for j in range(count)]


def synthetic_shard_bytes(count: int) -> int:
    body = count * (HEADER + -(-PPM_BYTES // BLOCK) * BLOCK) + 2 * BLOCK  # end-of-archive blocks
    return -(-body // RECORD) * RECORD


def shard_counts(total: int, shard_size: int) -> list[int]:
    return [shard_size] * (total // shard_size) + ([total % shard_size] if total % shard_size else [])


def write_tars(root: Path, total: int, shard_size: int) -> None:
    import webdataset as wds

    from radio_core.data.shards import index_shards

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    head = f"P6\n{PPM_SIDE} {PPM_SIDE}\n255\n".encode()
    first = 0
    for s, count in enumerate(shard_counts(total, shard_size)):
        pixels = rng.integers(0, 256, (count, 3 * PPM_SIDE * PPM_SIDE), dtype=np.uint8)
        with wds.TarWriter(str(root / f"{s:07d}.tar"), encoder=False, mtime=0) as tw:
            for j in range(count):
                tw.write({"__key__": key_of(first + j), "ppm": head + pixels[j].tobytes()})
        first += count
    index_shards(str(root), progress=False)


def write_synthetic(root: Path, total: int, shard_size: int, only: set[int] | None = None) -> None:
    """Index files (all, or the shards in ``only``) and the table, as ``index`` would write them."""
    from radio_core.data.shard_index import IMAGE_KEYS, INDEX_FORMAT, MEMBER_FIELDS, ShardTable, index_file

    root.mkdir(parents=True, exist_ok=True)
    counts = shard_counts(total, shard_size)
    names = [f"{s:07d}.tar" for s in range(len(counts))]
    sizes = [synthetic_shard_bytes(c) for c in counts]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for s in (range(len(counts)) if only is None else sorted(only)):
        index_file(root / names[s]).write_text(json.dumps(
            {"format": INDEX_FORMAT, "shard": names[s], "stamp": {"bytes": sizes[s]}, "image_keys": list(IMAGE_KEYS),
             "member_fields": MEMBER_FIELDS, "members": synthetic_members(int(starts[s]), counts[s])},
            separators=(",", ":")))
    ShardTable([str(root)], np.zeros(len(counts), np.int32), names, counts, sizes, IMAGE_KEYS).save(root)


def check_arithmetic(root: Path, total: int, shard_size: int) -> int:
    """The synthetic index of every real shard equals its scanned index file; returns shards checked."""
    from radio_core.data.shard_index import ShardTable, read_shard_index

    table = ShardTable.load(root)
    first = 0
    for s in range(len(table)):
        count = int(table.counts[s])
        assert read_shard_index(table.path(s)) == synthetic_members(first, count), f"shard {s}"
        assert int(table.sizes[s]) == synthetic_shard_bytes(count) == table.path(s).stat().st_size, f"shard {s}"
        first += count
    assert first == total
    return len(table)


def touched_shards(total: int, shard_size: int, step: int) -> set[int]:
    from radio_core.data.sampling import StepBatchSampler

    counts = np.asarray(shard_counts(total, shard_size), dtype=np.int64)
    sampler = StepBatchSampler(total, BATCH, 0, rank=RANK, world_size=WORLD, shard_sizes=counts, block_shards=4)
    ends = np.cumsum(counts)
    return {int(np.searchsorted(ends, r.index, side="right")) for r in sampler.refs(step)}


# ---------------------------------------------------------------------------------------
# one measurement, in a fresh interpreter


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(root: str, step: int, legacy: bool, read: bool, trace: bool) -> dict:
    import tracemalloc

    from radio_core.data.sampling import StepBatchSampler, sampling_kwargs
    from radio_core.data.shard_index import ShardTable, read_shard_index
    from radio_core.data.shards import TarShardSource

    base = rss_kb("VmRSS")
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    if legacy:  # the earlier reader: every member of every shard held for the run
        table = ShardTable.load(Path(root))
        keys, offsets, sizes, counts = [], [], [], []
        for s in range(len(table)):
            rows = read_shard_index(table.path(s), size=int(table.sizes[s]))
            counts.append(len(rows))
            for key, _ext, offset, size, *_ in rows:
                keys.append(key)
                offsets.append(offset)
                sizes.append(size)
        held = (keys, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64),
                np.repeat(np.arange(len(counts), dtype=np.int32), counts))
        sampler = StepBatchSampler(len(keys), BATCH, 0, rank=RANK, world_size=WORLD, shard_sizes=np.asarray(counts),
                                   block_shards=4)
        batch = [held[0][r.index] for r in sampler.refs(step)]
        loaded = len(table)
    else:
        src = TarShardSource(root, block_shards=4)
        sampler = StepBatchSampler(len(src), BATCH, 0, rank=RANK, world_size=WORLD, **sampling_kwargs(src))
        refs = sampler.refs(step)
        batch = [src.key(r.index) for r in refs]
        if read:
            batch = [src.read(r.index) for r in refs]
        loaded = len(src._members)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    return {"seconds": seconds, "peak_mb": peak / 2**20, "rss_mb": (rss_kb("VmHWM") - base) / 1024,
            "batch": len(batch), "indexes_loaded": loaded}


def run_measure(root: Path, step: int, legacy: bool, read: bool) -> dict:
    out = {}
    for trace in (False, True):
        cmd = [sys.executable, __file__, "--measure", str(root), "--step", str(step)]
        cmd += (["--legacy"] if legacy else []) + (["--read"] if read else []) + (["--trace"] if trace else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        got = json.loads(res.stdout.strip().splitlines()[-1])
        out.update({"seconds": got["seconds"], "rss_mb": got["rss_mb"], "indexes_loaded": got["indexes_loaded"]}
                   if not trace else {"peak_mb": got["peak_mb"]})
    return out


# ---------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank, for the per-rank total")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp dir, removed)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--step", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--read", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.step, args.legacy, args.read, args.trace)))
        return 0

    tiers = ([(10**4, "tars"), (10**5, "index")] if args.quick else
             [(10**5, "tars"), (10**6, "tars"), (10**7, "index"), (1_400_000_000, "table")])
    scratch = tempfile.TemporaryDirectory(dir=args.dir)
    rows = []
    for total, kind in tiers:
        root = Path(scratch.name) / f"n{total}"
        epoch_steps = total // (WORLD * BATCH)
        step = max(epoch_steps * 3 // 5, 0)  # a resume 60 % into the epoch
        t0 = time.perf_counter()
        if kind == "tars":
            write_tars(root, total, args.shard_size)
            checked = check_arithmetic(root, total, args.shard_size)
            note = f"real tars; synthetic arithmetic == scanned index on all {checked} shards"
        elif kind == "index":
            write_synthetic(root, total, args.shard_size)
            note = "index files + table from tar arithmetic, no tars"
        else:
            write_synthetic(root, total, args.shard_size, only=touched_shards(total, args.shard_size, step))
            note = "table; index files only for the shards this step reads"
        made = time.perf_counter() - t0
        new = run_measure(root, step, legacy=False, read=kind == "tars")
        old = run_measure(root, step, legacy=True, read=False) if kind != "table" else None
        shards = -(-total // args.shard_size)
        rows.append({"samples": total, "shards": shards, "kind": kind, "new": new, "old": old, "note": note,
                     "made_s": made})
        print(f"{total:.1e} samples ({kind}, made in {made:.0f} s): per-shard index {new['seconds']:.3f} s, "
              f"peak {new['peak_mb']:.1f} MB" + (f"; legacy {old['seconds']:.2f} s, peak {old['peak_mb']:.0f} MB"
                                                  if old else ""), flush=True)
        if kind != "table":
            import shutil

            shutil.rmtree(root)
    report(rows, args.shard_size, args.workers)
    return 0


def report(rows: list[dict], shard_size: int, workers: int) -> None:
    print(f"\nrank {RANK} of {WORLD}, batch {BATCH}, shards of {shard_size}, resumed 60 % into the epoch\n")
    print("| samples | shards | kind | start-up (s) | peak traced (MB) | RSS growth (MB) | shard indexes loaded "
          "| legacy start-up (s) | legacy peak (MB) | legacy / new peak |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n, o = r["new"], r["old"]
        legacy = (f"{o['seconds']:.2f} | {o['peak_mb']:.0f} | {o['peak_mb'] / max(n['peak_mb'], 1e-9):.0f}x"
                  if o else "- | - | -")
        print(f"| {r['samples']:.1e} | {r['shards']:,} | {r['kind']} | {n['seconds']:.3f} | {n['peak_mb']:.1f} | "
              f"{n['rss_mb']:.1f} | {n['indexes_loaded']} | {legacy} |")
    # Per-rank memory model: a constant (LRU of shard indexes, sampler block) plus bytes per shard.
    xs = np.array([r["shards"] for r in rows], dtype=np.float64)
    ys = np.array([r["new"]["peak_mb"] for r in rows])
    ts = np.array([r["new"]["seconds"] for r in rows])
    slope, const = np.polyfit(xs, ys, 1)
    tslope, tconst = np.polyfit(xs, ts, 1)
    slope, tslope = max(slope, 0.0), max(tslope, 0.0)  # a few noisy small rows can tilt the fit below zero
    print(f"\nfit over the rows: peak = {const:.1f} MB + {slope * 2**20:.0f} bytes/shard; "
          f"start-up = {tconst:.3f} s + {tslope * 1e6:.2f} us/shard")
    from radio_core.data.shard_index import ShardTable

    one = ShardTable(["/data"], [0], [f"{0:07d}.tar"], [shard_size], [1], ())
    per_shard_table = sum(a.nbytes for a in (one.dir_of, one.names, one.counts, one.sizes, one.ends))
    for total, size in ((1_400_000_000, shard_size), (1_400_000_000, 10_000)):
        shards = -(-total // size)
        mem = const + slope * shards
        worker_copy = shards * per_shard_table / 2**20  # each DataLoader worker unpickles the table
        print(f"extrapolated, {total:.1e} samples in {shards:,} shards of {size}, {WORLD} ranks: per rank "
              f"{mem:.0f} MB in the training process + {workers} workers x {worker_copy:.0f} MB table copy = "
              f"{mem + workers * worker_copy:.0f} MB (target <= 1024 MB); start-up {tconst + tslope * shards:.1f} s "
              "(target <= 60 s); legacy at ~100 B/sample: "
              f"{total * rows[-2]['old']['peak_mb'] / rows[-2]['samples'] / 1024:.0f} GB per rank")


if __name__ == "__main__":
    raise SystemExit(main())
