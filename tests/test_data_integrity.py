"""Data and integrity: ``radio pack`` never follows a symlink out of the folder it was given (nor
packs a FIFO); every packed or indexed sample carries a CRC-32 that each read verifies (a changed
byte is a bad sample, named and skipped, never silently different pixels); an index without
checksums is read with a warning. (Checkpoints without their ``checksums.json`` are refused:
tests/test_never_lose_a_run.py, case ``checksums_deleted``.)"""
import json
import os
import zlib

import numpy as np
import pytest
from PIL import Image

from radio_core.data.__main__ import main as data_main
from radio_core.data.shard_index import read_shard_index
from radio_core.data.shards import MANIFEST, CorruptSampleError, TarShardSource, pack_folder


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.fixture
def folder(tmp_path):
    """Two images, a symlink to one of them (inside: packed), symlinks to a file of another
    folder and to a system file (outside: never packed), a FIFO named like an image."""
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    _image(root / "a.png", 0)
    _image(root / "b.png", 1)
    (root / "again.png").symlink_to(root / "a.png")
    secret = _image(elsewhere / "secret.png", 2)
    (root / "leak.png").symlink_to(elsewhere / "secret.png")
    (root / "passwd.jpg").symlink_to("/etc/passwd")
    (root / "sub").mkdir()
    (root / "sub" / "up.png").symlink_to("../../elsewhere/secret.png")
    os.mkfifo(root / "pipe.jpg")
    return root, secret


def test_pack_never_follows_a_symlink_out_of_its_folder(folder, tmp_path, capsys):
    root, secret = folder
    out = tmp_path / "shards"
    assert data_main(["pack", str(root), str(out), "--no-shuffle"]) == 0
    said = capsys.readouterr().out
    assert "skipped 3 symlink(s) leading out of" in said
    m = json.loads((out / MANIFEST).read_text())
    assert sorted(m["skipped_links"]) == ["leak.png", "passwd.jpg", "sub/up.png"]
    assert m["count"] == 3  # a.png, again.png (a link inside the folder), b.png; the FIFO is not a file
    packed = b"".join((out / s["name"]).read_bytes() for s in m["shards"])
    assert secret not in packed and b"root:" not in packed


def test_every_sample_is_verified_by_its_crc32(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "shards"
    pack_folder(str(root), str(out), shard_size=10, shuffle_seed=None, progress=False)
    shard = out / "000000.tar"
    rows = read_shard_index(shard)
    assert all(isinstance(r[4], int) and r[4] >= 0 for r in rows)
    source = TarShardSource(str(out))
    assert [zlib.crc32(source.read(i)) for i in range(len(source))] == [r[4] for r in rows]
    data = bytearray(shard.read_bytes())  # one bit of one image flips on disk (same size: the table agrees)
    data[rows[1][2] + 100] ^= 0x01
    shard.write_bytes(bytes(data))
    source = TarShardSource(str(out))
    source.load(0)
    with pytest.raises(CorruptSampleError, match=r"member 'again' fails its CRC-32 checksum"):
        source.load(1)


def test_an_index_without_checksums_is_read_with_a_warning(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "shards"
    pack_folder(str(root), str(out), shard_size=10, shuffle_seed=None, progress=False)
    index = out / "000000.tar.index.json"
    data = json.loads(index.read_text())
    data["members"] = [r[:4] for r in data["members"]]  # as an older version wrote it
    data["member_fields"] = data["member_fields"][:4]
    index.write_text(json.dumps(data))
    source = TarShardSource(str(out))
    with pytest.warns(UserWarning, match="holds no checksums, so its samples are read unverified"):
        source.load(0)
