"""Tar shards and HF datasets as random-access image sources: packing, manifest, pixels,
patterns, index scanning, corrupt members, worker pickling, command line."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from radio_core.data.augment import AugmentedImages, collate
from radio_core.data.sampling import SampleRef, StepBatchSampler, sampling_kwargs
from radio_core.data.shard_index import TABLE, ShardTable, read_shard_index
from radio_core.data.shards import MANIFEST, CorruptSampleError, TarShardSource, expand_shards, pack_folder, scan_tar
from radio_core.data.sources import ImageFolderSource, SkimageSamplesSource
from radio_core.registry import PluginError


def keys(src: TarShardSource) -> list[str]:
    return [src.key(i) for i in range(len(src))]


def members(out: Path, shard: dict) -> list[list]:
    """A packed shard's index, from the file beside it."""
    rows = read_shard_index(out / shard["name"])
    assert rows is not None, f"no valid index beside {shard['name']}"
    return rows


def make_foreign(out: Path) -> Path:
    """Shards as another tool leaves them: no manifest, table or index files."""
    for p in [out / MANIFEST, out / TABLE, *out.glob("*.index.json")]:
        p.unlink()
    return out


def write_photos(folder: Path) -> SkimageSamplesSource:
    """The packaged sample photos as files: JPEG and PNG alternately, under skimage/ and sklearn/."""
    src = SkimageSamplesSource()
    for i in range(len(src)):
        key = src.key(i).replace(".", "_")  # sklearn's keys end in .jpg
        path = folder / f"{key}.{'jpg' if i % 2 == 0 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        src.load(i).save(path, **({"quality": 90} if i % 2 == 0 else {"compress_level": 1}))
    return src


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder)
    return folder


@pytest.fixture(scope="module")
def packed(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = pack_folder(str(photos), str(out), shard_size=5, progress=False)
    return out, manifest


def copy_shards(packed, dest: Path) -> Path:
    shutil.copytree(packed[0], dest)
    return dest


def test_pack_writes_shards_and_a_correct_manifest(photos, packed):
    out, m = packed
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    n = len(files)
    assert n >= 12
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == m
    assert m["count"] == n and m["source"] == str(photos.resolve()) and m["shard_size"] == 5
    assert [s["name"] for s in m["shards"]] == [f"{i:06d}.tar" for i in range((n + 4) // 5)]
    assert [s["count"] for s in m["shards"]] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert m["bytes"] == sum((out / s["name"]).stat().st_size for s in m["shards"])
    assert m["image_bytes"] == sum(f.stat().st_size for f in files)
    # offsets and sizes are exactly where tarfile finds each member, and the bytes are the files'
    assert "members" not in m["shards"][0]  # the manifest stays O(shards): members live per shard
    table = ShardTable.load(out)
    assert [n.decode() for n in table.names] == [s["name"] for s in m["shards"]]
    assert list(table.counts) == [s["count"] for s in m["shards"]] and list(table.sizes) == [s["bytes"] for s in
                                                                                           m["shards"]]
    for shard in m["shards"]:
        tar_members = scan_tar(out / shard["name"])
        assert [mm[:4] for mm in members(out, shard)] == tar_members
        with open(out / shard["name"], "rb") as f:
            for key, ext, offset, size, crc, source_path in members(out, shard):
                assert source_path == f"{key}.{ext}"
                f.seek(offset)
                data = f.read(size)
                assert data == (photos / source_path).read_bytes() and crc == zlib.crc32(data)


def test_random_access_gives_the_folder_sources_pixels(photos, packed):
    shards = TarShardSource(str(packed[0]))
    folder = ImageFolderSource(str(photos))
    by_key = {str(Path(folder.key(i)).with_suffix("")): i for i in range(len(folder))}
    assert len(shards) == len(folder) and set(keys(shards)) == set(by_key)
    for i in reversed(range(len(shards))):  # any order: random access
        a, b = shards.load(i), folder.load(by_key[shards.key(i)])
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b)), shards.key(i)


def test_packed_shards_are_standard_webdataset(packed):
    import webdataset as wds

    shards = TarShardSource(str(packed[0]))
    pattern = f"{packed[0]}/{{000000..{len(packed[1]['shards']) - 1:06d}}}.tar"
    samples = list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == keys(shards)
    for i, s in enumerate(samples):
        assert (s.get("jpg") or s.get("png")) == shards.read(i)


def test_brace_patterns_lists_and_missing_shards(packed):
    out, m = packed
    assert len(TarShardSource(f"{out}/{{000000..000001}}.tar")) == 10
    two = TarShardSource(f"{out}/000000.tar::{out}/000002.tar")
    assert len(two) == m["shards"][0]["count"] + m["shards"][2]["count"]
    assert list(two.shard_sizes) == [5, m["shards"][2]["count"]]
    assert len(TarShardSource(str(out / MANIFEST))) == m["count"]
    assert expand_shards([str(out / "000001.tar"), f"{out}/{{000000..000000}}.tar"]) == [out / "000001.tar",
                                                                                            out / "000000.tar"]
    with pytest.raises(FileNotFoundError, match=r"data.source.args.shards: .*000099.tar"):
        TarShardSource(f"{out}/{{000098..000099}}.tar")
    with pytest.raises(ValueError, match="data.source.args.shuffle"):
        TarShardSource(str(out), shuffle="buffer")


def test_without_manifest_the_index_is_scanned_once_and_cached(packed, tmp_path, monkeypatch):
    out = make_foreign(copy_shards(packed, tmp_path / "s"))
    with_manifest = TarShardSource(str(packed[0]))
    scanned = TarShardSource(str(out))
    assert keys(scanned) == keys(with_manifest)
    assert all(scanned.read(i) == with_manifest.read(i) for i in range(len(scanned)))
    assert sorted(p.name for p in (out / ".radio_index").iterdir()) == [f"{s['name']}.index.json"
                                                                       for s in packed[1]["shards"]]

    import radio_core.data.shards as shards_mod

    def no_scan(*a, **k):
        raise AssertionError("the cached index should have been used")

    monkeypatch.setattr(shards_mod, "scan_tar", no_scan)
    assert keys(TarShardSource(str(out))) == keys(with_manifest)
    # An explicit cache folder (read-only shard storage) works the same way.
    monkeypatch.undo()
    cache = tmp_path / "cache"
    assert keys(TarShardSource(str(out), index_cache=str(cache))) == keys(with_manifest)
    assert len(list(cache.rglob("*.index.json"))) == len(packed[1]["shards"])


def test_captions_and_other_members_are_ignored(tmp_path):
    import webdataset as wds
    from PIL import Image

    buf = __import__("io").BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, format="webp")
    with wds.TarWriter(str(tmp_path / "a.tar"), encoder=False) as tw:
        tw.write({"__key__": "x/0001", "txt": b"a caption", "webp": buf.getvalue(), "json": b"{}"})
        tw.write({"__key__": "x/0002", "txt": b"caption only"})
        tw.write({"__key__": "x/0003", "png": buf.getvalue(), "jpg": buf.getvalue()})  # jpg preferred
    src = TarShardSource(str(tmp_path / "a.tar"))
    assert keys(src) == ["x/0001", "x/0003"]
    assert src.load(0).size == (8, 6)


def test_corrupt_member_is_skipped_and_counted(packed, tmp_path):
    out = copy_shards(packed, tmp_path / "s")
    victim = members(out, packed[1]["shards"][1])[2]
    with open(out / "000001.tar", "r+b") as f:  # same length, tar structure intact
        f.seek(victim[2])
        f.write(b"\x00not an image" * (victim[3] // 13) + b"\x00" * (victim[3] % 13))
    src = TarShardSource(str(out))
    with pytest.raises(CorruptSampleError, match=victim[0]):
        src.load(keys(src).index(victim[0]))
    ds = AugmentedImages(src, (24, 24))
    sampler = StepBatchSampler(len(src), batch_size=len(src), seed=0, stop=1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)))
    bad = [src.key(int(i)) for i, ok in zip(batch["index"], batch["valid"]) if not ok]
    assert bad == [victim[0]] and len(batch["errors"]) == 1 and victim[0] in batch["errors"][0]


def damage(out: Path, packed) -> list:
    """Cut the last shard inside its last member; overwrite the first with bytes that are no tar."""
    last = packed[1]["shards"][-1]
    cut = members(packed[0], last)[-1]
    with open(out / last["name"], "r+b") as f:
        f.truncate(cut[2] + cut[3] // 2)
    (out / "000000.tar").write_bytes(b"not a tar file" * 100)
    return cut


def test_truncated_foreign_shard_loses_only_its_cut_member(packed, tmp_path):
    out = make_foreign(copy_shards(packed, tmp_path / "s"))
    cut = damage(out, packed)
    with pytest.warns(UserWarning) as caught:  # without a table, start-up scans and skips the bad shard
        src = TarShardSource(str(out))
    messages = " | ".join(str(w.message) for w in caught)
    assert "truncated" in messages and "000000.tar: not a readable tar file" in messages
    assert src.skipped_shards == [str(out / "000000.tar")]
    assert len(src) == packed[1]["count"] - packed[1]["shards"][0]["count"]
    ds = AugmentedImages(src, (16, 16))
    valid = {src.key(i): ds[SampleRef(i, i, i)]["valid"] for i in range(len(src))}
    assert [k for k, ok in valid.items() if not ok] == [cut[0]]
    assert "truncated" in ds[SampleRef(0, keys(src).index(cut[0]), 0)]["error"]


def test_shards_damaged_after_indexing_are_found_when_read(packed, tmp_path):
    """With a table, start-up reads one file and stats no shard, so damage done since indexing
    shows when a shard is opened: the shard is re-indexed, and its unreadable members are
    counted as bad images with the reason, never a crash and never a shift of other samples."""
    out = copy_shards(packed, tmp_path / "s")
    cut = damage(out, packed)
    src = TarShardSource(str(out))
    assert len(src) == packed[1]["count"] and src.skipped_shards == []
    ds = AugmentedImages(src, (16, 16))
    with pytest.warns(UserWarning, match="when indexed; re-indexing it"):
        items = [ds[SampleRef(i, i, i)] for i in range(len(src))]
    first = packed[1]["shards"][0]["count"]
    assert not any(it["valid"] for it in items[:first])  # every member of the shard that is no tar
    assert all("000000.tar: not a readable tar file" in it["error"] for it in items[:first])
    bad_rest = [src.key(i) for i, it in enumerate(items[first:], first) if not it["valid"]]
    assert bad_rest == [cut[0]] and "truncated" in items[keys(src).index(cut[0])]["error"]


def test_per_shard_index_gives_the_samples_of_the_all_in_memory_index(packed, tmp_path, monkeypatch):
    """The earlier reader concatenated every shard's scanned members in shard order and kept
    them all; the per-shard index must number samples identically, so every step of a run
    (and of a resumed run) draws the same images."""
    out = packed[0]
    shards = sorted(out.glob("*.tar"))
    legacy = [(p, m) for p in shards for m in scan_tar(p)]  # the old global index, one row per sample
    legacy_sizes = [len(scan_tar(p)) for p in shards]
    import radio_core.data.shards as shards_mod

    def no_shard_index(*a, **k):
        raise AssertionError("start-up must not open a per-shard index")

    monkeypatch.setattr(shards_mod, "shard_index", no_shard_index)
    src = TarShardSource(str(out), block_shards=2, index_lru=2)
    assert len(src) == len(legacy) and list(src.shard_sizes) == legacy_sizes
    monkeypatch.undo()
    for i, (path, (key, _ext, offset, size)) in enumerate(legacy):
        assert src.key(i) == key and src.shard_path(i) == path
        with open(path, "rb") as f:
            f.seek(offset)
            assert src.read(i) == f.read(size)
    assert len(src._members) <= 2  # the LRU of loaded shard indexes stays bounded
    # The same holds for the older manifest format with members inline (no table, no index files).
    old = copy_shards(packed, tmp_path / "v1")
    m = json.loads((old / MANIFEST).read_text())
    for s in m["shards"]:
        s["members"] = members(old, s)
    m["format"] = "radio-distill-shards/1"
    for p in [old / MANIFEST, old / TABLE, *old.glob("*.index.json")]:
        p.unlink()
    (old / MANIFEST).write_text(json.dumps(m))
    v1 = TarShardSource(str(old))
    assert keys(v1) == [m[0] for _, m in legacy] and list(v1.shard_sizes) == legacy_sizes
    # Sample identities per step and rank are then the old ones: sampling sees only (length, shard sizes).
    kw = {"shard_sizes": legacy_sizes, "block_shards": 2}
    for rank in range(2):
        new = StepBatchSampler(len(src), 3, seed=4, rank=rank, world_size=2, **sampling_kwargs(src))
        ref = StepBatchSampler(len(legacy), 3, seed=4, rank=rank, world_size=2, **kw)
        for step in range(12):
            assert [src.key(r.index) for r in new.refs(step)] == [legacy[r.index][1][0] for r in ref.refs(step)]


def test_source_pickles_without_file_handles_and_workers_read_the_same(packed):
    src = TarShardSource(str(packed[0]))
    src.load(0)
    assert src._fds and src._members  # opened lazily by the first read
    clone = pickle.loads(pickle.dumps(src))
    assert clone._fds == {} and not clone._members and np.array_equal(np.asarray(clone.load(3)), np.asarray(src.load(3)))

    ds = AugmentedImages(src, (32, 32))

    def images(workers):
        sampler = StepBatchSampler(len(src), batch_size=4, seed=1, stop=5)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        return torch.cat([b["image"] for b in loader])

    assert torch.equal(images(0), images(2))


def test_pack_command_line(photos, tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "radio_core.data", "pack", str(photos), str(out), "--shard-size", "6",
                          "--no-shuffle"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    files = sorted(str(p.relative_to(photos)) for p in photos.rglob("*") if p.is_file())
    n = len(files)
    assert f"packed {n} images" in res.stdout and f"into {(n + 5) // 6} shard(s)" in res.stdout
    m = json.loads((out / MANIFEST).read_text())
    assert m["count"] == n and m["shuffle_seed"] is None
    assert [mm[5] for s in m["shards"] for mm in members(out, s)] == files  # folder order kept
    again = subprocess.run([sys.executable, "-m", "radio_core.data", "pack", str(photos), str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already holds shards" in again.stderr


def test_index_command_writes_a_manifest_for_foreign_shards(packed, tmp_path):
    from radio_core.data.__main__ import main

    out = make_foreign(copy_shards(packed, tmp_path / "s"))
    assert main(["index", f"{out}/{{000000..{len(packed[1]['shards']) - 1:06d}}}.tar"]) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert m["count"] == packed[1]["count"] and (out / TABLE).is_file()
    # (the same members with the same CRC-32s as pack wrote, without pack's source paths)
    assert [members(out, s) for s in m["shards"]] == [[mm[:5] for mm in members(packed[0], s)]
                                                      for s in packed[1]["shards"]]


def test_dataset_plugins_are_registered(registry, packed):
    assert {"webdataset", "hf_datasets"} <= set(registry.names("dataset"))
    src = registry.build("dataset", "webdataset", shards=str(packed[0]), block_shards=2)
    assert len(src) == packed[1]["count"] and src.block_shards == 2


def test_hf_datasets_source(tmp_path, registry):
    datasets = pytest.importorskip("datasets")
    photos = SkimageSamplesSource(names=["astronaut", "coffee", "chelsea", "camera"], include_sklearn=False)
    names = [photos.key(i) for i in range(len(photos))]
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [photos.load(i) for i in range(len(photos))], "name": names},
                                    features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))

    src = registry.build("dataset", "hf_datasets", path=str(tmp_path / "hf"), split="train", key_column="name")
    assert len(src) == 4 and [src.key(i) for i in range(4)] == names
    for i in range(4):
        assert np.array_equal(np.asarray(src.load(i)), np.asarray(photos.load(i)))
    clone = pickle.loads(pickle.dumps(src))  # DataLoader workers re-open the arrow files
    assert clone._ds is None and np.array_equal(np.asarray(clone.load(2)), np.asarray(photos.load(2)))
    assert registry.build("dataset", "hf_datasets", path=str(tmp_path / "hf")).key(1) == "hf/train/00000001"

    # a row whose bytes are not an image is flagged and counted, not fatal
    raw = datasets.Dataset.from_dict({"image": [{"bytes": b"garbage", "path": None}]},
                                     features=datasets.Features({"image": datasets.Image()}))
    raw.save_to_disk(str(tmp_path / "bad"))
    bad = registry.build("dataset", "hf_datasets", path=str(tmp_path / "bad"))
    item = AugmentedImages(bad, (8, 8))[SampleRef(0, 0, 0)]
    assert not item["valid"] and "CorruptSampleError" in item["error"]
    with pytest.raises(PluginError, match="KeyError: .*data.source.args.image_column: no column 'img'"):
        registry.build("dataset", "hf_datasets", path=str(tmp_path / "hf"), image_column="img")
    with pytest.raises(PluginError, match="KeyError: .*data.source.args.split: 'test'"):
        registry.build("dataset", "hf_datasets", path=str(tmp_path / "hf"), split="test")
