"""The byte index of webdataset tar shards, kept per shard, and the global table of counts.

* ``scan_tar`` reads a tar's headers once: ``[key, ext, offset, size]`` per image member.
* A shard's index lives in ``000000.tar.index.json`` beside it (written by ``pack`` and
  ``index``, stamped with the shard's byte size so a copied directory keeps it valid). For
  foreign shards without one, a header scan is cached once (``shard_index``).
* ``ShardTable`` is what a reader holds for the whole dataset: shard names, image counts and
  byte sizes as numpy arrays, stored as ``shard_table.npz`` beside the shards. A global sample
  number maps to (shard, member) by a binary search in the cumulative counts.

Members are in file order, and shards in the order they were listed, so the global numbering of
samples is the one the earlier all-in-memory index gave.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..utils import real_path

INDEX_FORMAT = "radio-distill-shard-index/1"
TABLE_FORMAT = "radio-distill-shard-table/1"
TABLE = "shard_table.npz"
INDEX_SUFFIX = ".index.json"
MEMBER_FIELDS = ["key", "ext", "offset", "size"]
#: member extensions read as images, in order of preference when a sample has several.
#: Captions (txt, json) and other members are ignored.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")


class CorruptSampleError(OSError):
    """A tar member that cannot be read or decoded. An ``OSError``, so the loader's
    ``AugmentedImages`` flags the sample invalid (counted as a bad image) instead of failing."""


def split_member_name(name: str) -> tuple[Optional[str], Optional[str]]:
    """webdataset's own rule: the key is everything before the first dot of the basename."""
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def scan_tar(path: Path, image_keys: Sequence[str] = IMAGE_KEYS) -> list[list]:
    """Read a tar's headers once (no image data) and pick one image member per sample key.

    Returns ``[[key, ext, offset, size], ...]`` in file order. A truncated member is kept
    (reading it fails and is counted as a bad image); a truncated or corrupt header ends the
    scan with a warning; a file that is no tar at all raises ``CorruptSampleError``."""
    preference = {ext: rank for rank, ext in enumerate(image_keys)}
    chosen: dict[str, list] = {}
    file_size = path.stat().st_size
    end = 0
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.ReadError as exc:
        raise CorruptSampleError(f"{path}: not a readable tar file ({exc})") from None
    with tar:
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as exc:  # data of the previous member runs past the end
                warnings.warn(f"{path}: truncated at byte {file_size} ({exc}); indexed {len(chosen)} "
                              "member(s) before the cut", stacklevel=2)
                break
            if info is None:
                break
            end = info.offset_data + info.size
            if not info.isfile():
                continue
            key, ext = split_member_name(info.name)
            if key is None or ext.lower() not in preference:
                continue
            old = chosen.get(key)
            if old is None or preference[ext.lower()] < preference[old[1].lower()]:
                chosen[key] = [key, ext, info.offset_data, info.size]
    if end < file_size and file_size - end > tarfile.RECORDSIZE + 2 * tarfile.BLOCKSIZE:
        warnings.warn(f"{path}: tar headers stop at byte {end} of {file_size} (corrupt header?); "
                      "members after it are not indexed", stacklevel=2)
    return sorted(chosen.values(), key=lambda m: m[2])


# ---------------------------------------------------------------------------------------
# per-shard index files


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write-then-rename: ranks reading at once never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def index_file(shard: Path) -> Path:
    return shard.with_name(shard.name + INDEX_SUFFIX)


def write_shard_index(shard: Path, members: list[list], image_keys: Sequence[str] = IMAGE_KEYS,
                      fields: Sequence[str] = MEMBER_FIELDS) -> Path:
    """The index file beside ``shard``. Stamped with the shard's byte size only: a copy of the
    directory (new mtimes) keeps it valid, a shard rewritten to another size does not."""
    path = index_file(shard)
    atomic_write(path, json.dumps({"format": INDEX_FORMAT, "shard": shard.name,
                                   "stamp": {"bytes": shard.stat().st_size}, "image_keys": list(image_keys),
                                   "member_fields": list(fields), "members": members}, separators=(",", ":")))
    return path


def read_shard_index(shard: Path, image_keys: Sequence[str] = IMAGE_KEYS,
                     size: Optional[int] = None) -> Optional[list[list]]:
    """Members from the index file beside ``shard``, or None when there is none or it does not
    match the image keys or ``size`` (the shard's byte size: from the table, else stat'ed)."""
    try:
        data = json.loads(index_file(shard).read_text())
    except (OSError, ValueError):
        return None
    if data.get("format") != INDEX_FORMAT or data.get("image_keys") != list(image_keys):
        return None
    if size is None:
        try:
            size = shard.stat().st_size
        except OSError:
            return None
    return data["members"] if data.get("stamp", {}).get("bytes") == size else None


def _scan_cache_files(path: Path, cache_dir: Optional[str]) -> list[Path]:
    """Where a scanned index may be cached: ``cache_dir``, else next to the shards, else $TMPDIR."""
    name = f"{path.name}{INDEX_SUFFIX}"
    if cache_dir:
        return [Path(cache_dir) / hashlib.sha1(str(real_path(path)).encode()).hexdigest()[:16] / name]
    digest = hashlib.sha1(str(real_path(path).parent).encode()).hexdigest()[:16]
    return [path.parent / ".radio_index" / name, Path(tempfile.gettempdir()) / "radio_shard_index" / digest / name]


def shard_index(path: Path, image_keys: Sequence[str] = IMAGE_KEYS, cache_dir: Optional[str] = None,
                size: Optional[int] = None) -> list[list]:
    """A shard's members: its index file when it matches (``size`` from the table saves a
    stat), else a cached header scan when the shard is unchanged, else a scan (then cached)."""
    members = read_shard_index(path, image_keys, size)
    if members is not None:
        return members
    st = path.stat()
    stamp = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    candidates = _scan_cache_files(path, cache_dir)
    for cached in candidates:
        try:
            data = json.loads(cached.read_text())
        except (OSError, ValueError):
            continue
        if (data.get("format") == INDEX_FORMAT and data.get("stamp") == stamp
                and data.get("image_keys") == list(image_keys)):
            return data["members"]
    members = scan_tar(path, image_keys)
    payload = json.dumps({"format": INDEX_FORMAT, "shard": str(real_path(path)), "stamp": stamp,
                          "image_keys": list(image_keys), "member_fields": MEMBER_FIELDS, "members": members})
    for cached in candidates:  # first writable location wins
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cached, payload)
            break
        except OSError:
            continue
    return members


# ---------------------------------------------------------------------------------------
# the global table


class ShardTable:
    """Shards in sample order with their image counts and byte sizes: O(shards) numpy arrays
    (names as fixed-width bytes, about 30 bytes per shard in all), the only per-dataset state a
    reader holds."""

    def __init__(self, dirs: Sequence[str], dir_of, names, counts, sizes, image_keys: Sequence[str]) -> None:
        self.dirs = [str(d) for d in dirs]
        self.dir_of = np.asarray(dir_of, dtype=np.int32)
        self.names = np.asarray(names, dtype=np.bytes_)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.image_keys = tuple(image_keys)
        self.ends = np.cumsum(self.counts)

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def path(self, shard: int) -> Path:
        return Path(self.dirs[self.dir_of[shard]]) / self.names[shard].decode()

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, member) of global sample ``index``."""
        if not 0 <= index < self.total:
            raise IndexError(f"sample {index} out of range (dataset of {self.total})")
        shard = int(np.searchsorted(self.ends, index, side="right"))
        return shard, int(index - (self.ends[shard - 1] if shard else 0))

    def nonempty(self) -> "ShardTable":
        keep = self.counts > 0
        return ShardTable(self.dirs, self.dir_of[keep], self.names[keep], self.counts[keep], self.sizes[keep],
                          self.image_keys)

    @classmethod
    def concat(cls, tables: Sequence["ShardTable"]) -> "ShardTable":
        dirs, dir_of = [], []
        for t in tables:
            remap = np.array([len(dirs) + i for i in range(len(t.dirs))], dtype=np.int32)
            dirs += t.dirs
            dir_of.append(remap[t.dir_of] if len(t) else t.dir_of)
        cat = lambda arrays, dt: np.concatenate(arrays) if arrays else np.zeros(0, dt)  # noqa: E731
        return cls(dirs, cat(dir_of, np.int32), cat([t.names for t in tables], np.bytes_),
                   cat([t.counts for t in tables], np.int64), cat([t.sizes for t in tables], np.int64),
                   tables[0].image_keys if tables else IMAGE_KEYS)

    def save(self, directory: Path) -> Path:
        """``directory/shard_table.npz`` for shards that all live in ``directory``."""
        import io

        buf = io.BytesIO()
        np.savez(buf, format=np.array(TABLE_FORMAT), names=self.names, counts=self.counts, sizes=self.sizes,
                 image_keys=np.array(self.image_keys))
        path = Path(directory) / TABLE
        atomic_write(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, directory: Path) -> Optional["ShardTable"]:
        """The table of ``directory``: ``shard_table.npz``, else the shard list of its
        ``manifest.json`` (also the older format with members inline), else None."""
        directory = Path(directory)
        try:
            with np.load(directory / TABLE, allow_pickle=False) as z:
                if str(z["format"]) == TABLE_FORMAT:
                    return cls([str(directory)], np.zeros(len(z["counts"]), np.int32), z["names"], z["counts"],
                               z["sizes"], [str(k) for k in z["image_keys"]])
        except (OSError, ValueError, KeyError):
            pass
        return _table_from_manifest(directory)


MANIFEST = "manifest.json"
MANIFEST_FORMATS = ("radio-distill-shards/1", "radio-distill-shards/2")


def _table_from_manifest(directory: Path) -> Optional[ShardTable]:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") not in MANIFEST_FORMATS:
            return None
        shards = data["shards"]
        return ShardTable([str(directory)], np.zeros(len(shards), np.int32), [s["name"] for s in shards],
                          [s["count"] for s in shards], [s["bytes"] for s in shards],
                          data.get("image_keys") or IMAGE_KEYS)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"{path}: unreadable manifest ({exc}); scanning the shards instead", stacklevel=3)
        return None
