"""Webdataset tar shards as a random-access image source, indexed per shard.

Exact resume, rank partitioning and world-size changes all come from sampling being a pure
function of the global sample number (``radio_core.data.sampling``), which needs random access. Tar
shards give it cheaply: a member's bytes sit at a fixed offset in its shard, so an index of
(key, offset, size) per member turns ``load(i)`` into one ``pread``.

The index scales with shards, not samples:

* every shard has its own index file, ``000000.tar.index.json`` beside it (written by ``pack``
  and ``index``; for foreign shards a header scan is cached once, see ``shard_index``);
* ``shard_table.npz`` beside the shards is the global table: shard names, image counts and
  byte sizes as numpy arrays (about 30 bytes per shard); ``manifest.json`` is its readable twin;
* a reader holds only that table (a global sample number maps to its shard by a binary search
  in the cumulative counts) and loads the per-shard index of a shard it reads into a small LRU.
  Start-up reads one file, stats no shard; a shard that changed since it was indexed is found
  when it is opened and re-scanned then. Shards added to a directory after ``pack``/``index``
  are not in its table: re-run ``python -m radio_core.data index DIR``.

Memory per rank is O(shards) (~100 bytes per shard with the sampler's arrays), e.g. ~140 MB for
1.4 B samples in shards of 1000; ``bench/data_index.py`` measures it.
"""
from __future__ import annotations

import io
import json
import os
import time
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from ..utils import real_path
from .sources import IMAGE_EXTENSIONS, to_rgb
# re-exported: the shard tools' public names stay importable from here
from .shard_index import (IMAGE_KEYS, INDEX_FORMAT, INDEX_SUFFIX, MANIFEST, MEMBER_FIELDS, TABLE,  # noqa: F401
                          CorruptSampleError, ShardTable, atomic_write, index_file, read_shard_index, scan_tar,
                          shard_index, split_member_name, write_shard_index)

MANIFEST_FORMAT = "radio-distill-shards/2"


# ---------------------------------------------------------------------------------------
# packing


def _unique_key(rel: Path, used: set[str]) -> str:
    """Relative path without extension, made a valid webdataset key: no dots in the basename
    (webdataset splits the key at the first one), unique within the dataset."""
    stem = (rel.name[: -len(rel.suffix)] if rel.suffix else rel.name).replace(".", "_")
    key = stem if rel.parent == Path(".") else f"{rel.parent.as_posix()}/{stem}"
    base, n = key, 1
    while key in used:  # a.jpg and a.png in one folder
        key = f"{base}_{n}"
        n += 1
    used.add(key)
    return key


def pack_folder(folder: str, out_dir: str, shard_size: int = 1000, shard_bytes: float = 3e9,
                shuffle_seed: Optional[int] = 0, progress: bool = True) -> dict:
    """Pack every image under ``folder`` into webdataset shards ``out_dir/000000.tar ...``
    and write ``out_dir/manifest.json``; returns the manifest.

    Image bytes are stored unchanged under their extension (``key.jpg``, ``key.png``, ...).
    ``shuffle_seed`` shuffles the file order before packing (None keeps the sorted order):
    block-shuffled sampling reads a few shards at a time, so shards packed from a class-sorted
    folder would otherwise give batches of one class.
    """
    import webdataset as wds

    from ..progress import iterate

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"pack: image folder not found: {root}")
    if shard_size < 1:
        raise ValueError(f"pack: shard_size must be >= 1, got {shard_size}")
    files, outside = _files_inside(root)
    if not files:
        raise FileNotFoundError(f"pack: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}"
                                + (f" (skipped {len(outside)} symlink(s) leading out of it)" if outside else ""))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(files))
        files = [files[i] for i in order]
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")) or (out / MANIFEST).exists():
        raise FileExistsError(f"pack: {out} already holds shards; choose an empty output folder")

    used: set[str] = set()
    sources: dict[str, str] = {}  # key -> path relative to the folder
    finished: list[str] = []
    unreadable: list[str] = []
    pattern = str(out).replace("%", "%%") + os.sep + "%06d.tar"
    t0 = time.perf_counter()
    # mtime fixed: the same folder always packs to the same bytes.
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=shard_bytes, verbose=0, encoder=False, mtime=0,
                         post=finished.append) as sink:
        for path in iterate(files, "pack", "img", enabled=progress):
            rel = path.relative_to(root)
            try:
                data = path.read_bytes()
            except OSError as exc:  # one unreadable file must not stop packing a large folder
                unreadable.append(f"{rel}: {exc.strerror or exc}")
                continue
            key = _unique_key(rel, used)
            sources[key] = str(rel)
            sink.write({"__key__": key, path.suffix.lower().lstrip("."): data})
    shards = [_index_one(Path(f), IMAGE_KEYS, sources) for f in finished]
    manifest = {"format": MANIFEST_FORMAT, "count": sum(s["count"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards), "image_bytes": sum(s.pop("image_bytes") for s in shards),
                "source": str(real_path(root)), "shard_size": shard_size, "shuffle_seed": shuffle_seed,
                "unreadable": unreadable, "skipped_links": outside,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 3),
                "image_keys": list(IMAGE_KEYS), "member_fields": MEMBER_FIELDS + ["crc32", "source_path"],
                "index_files": f"<shard>{INDEX_SUFFIX}", "table": TABLE, "shards": shards}
    write_manifest(out, manifest)
    return manifest


def _files_inside(root: Path) -> tuple[list[Path], list[str]]:
    """Image files under ``root`` (regular files: no FIFO, device or socket) whose real path
    stays inside it, and the symlinks that lead out of it (never followed: a folder handed over
    must not pack a system file or another user's folder into shards that are then shared)."""
    real_root = real_path(root)
    inside, outside = [], []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        real = real_path(p)
        (inside if real_root in real.parents else outside).append(p)
    return inside, [str(p.relative_to(root)) for p in outside]


def _member_crcs(shard: Path, members: list[list]) -> list[int]:
    """CRC-32 of each member's bytes, read back from the shard (one sequential pass)."""
    fd = os.open(shard, os.O_RDONLY)
    try:
        return [zlib.crc32(os.pread(fd, int(m[3]), int(m[2]))) for m in members]
    finally:
        os.close(fd)


def _index_one(shard: Path, image_keys: Sequence[str], sources: Optional[dict[str, str]] = None) -> dict:
    """Scan a freshly written shard, write its index file (with each member's CRC-32, checked on
    every read); its manifest entry."""
    members = scan_tar(shard, image_keys)
    members = [m + [crc] for m, crc in zip(members, _member_crcs(shard, members))]
    if sources is not None:  # pack knows where each member came from
        members = [m + [sources[m[0]]] for m in members]
    write_shard_index(shard, members, image_keys,
                      MEMBER_FIELDS + ["crc32"] + (["source_path"] if sources is not None else []))
    return {"name": shard.name, "count": len(members), "bytes": shard.stat().st_size,
            "image_bytes": sum(m[3] for m in members)}


def write_manifest(out: Path, manifest: dict) -> Path:
    """``manifest.json`` (readable: a header, then one line per shard) and its compact twin
    ``shard_table.npz``, the global table every reader loads."""
    out = Path(out)
    entries = manifest["shards"]
    ShardTable([str(out)], np.zeros(len(entries), np.int32), [e["name"] for e in entries],
               [e["count"] for e in entries], [e["bytes"] for e in entries], manifest["image_keys"]).save(out)
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items() if k != "shards")
    shards = ",\n  ".join(json.dumps(e, separators=(",", ":")) for e in entries)
    atomic_write(out / MANIFEST, f'{{\n{head},\n "shards": [\n  {shards}\n ]\n}}\n')
    return out / MANIFEST


def index_shards(shards: str, image_keys: Sequence[str] = IMAGE_KEYS, progress: bool = True) -> dict:
    """Write per-shard index files, ``manifest.json`` and ``shard_table.npz`` for existing
    shards (made by other tools) in their directory, so that later readers never scan."""
    from ..progress import iterate

    paths = expand_shards(shards)
    if len({p.parent for p in paths}) != 1:
        raise ValueError(f"index: shards {shards!r} span several directories; index each directory")
    entries = []
    for p in iterate(paths, "index", "shard", enabled=progress):
        try:
            entries.append(_index_one(p, image_keys))
        except CorruptSampleError as exc:
            warnings.warn(f"index: skipping {exc}", stacklevel=2)
    manifest = {"format": MANIFEST_FORMAT, "count": sum(e["count"] for e in entries),
                "bytes": sum(e["bytes"] for e in entries), "image_bytes": sum(e.pop("image_bytes") for e in entries),
                "source": shards, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "image_keys": list(image_keys),
                "member_fields": MEMBER_FIELDS + ["crc32"], "index_files": f"<shard>{INDEX_SUFFIX}", "table": TABLE,
                "shards": entries}
    write_manifest(paths[0].parent, manifest)
    return manifest


# ---------------------------------------------------------------------------------------
# reading


def expand_shards(shards: str | Sequence[str]) -> list[Path]:
    """Shard files from a directory (its ``*.tar``), a brace pattern in webdataset syntax
    (``/data/{000000..000012}.tar``, several joined by ``::``), a single tar, or a list."""
    from webdataset.shardlists import expand_urls

    if not isinstance(shards, str):
        return [p for s in shards for p in expand_shards(s)]
    as_path = Path(shards).expanduser()
    if as_path.is_dir():
        found = sorted(as_path.glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"data.source.args.shards: no .tar files in {as_path}")
        return found
    if as_path.name in (MANIFEST, TABLE) and as_path.is_file():
        table = ShardTable.load(as_path.parent)
        if table is None:
            raise FileNotFoundError(f"data.source.args.shards: {as_path} is not a shard manifest")
        return [table.path(i) for i in range(len(table))]
    paths = [Path(u).expanduser() for u in expand_urls(shards)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"data.source.args.shards: shard file(s) not found: {', '.join(missing[:3])}{more}")
    return paths


def shard_table(shards: str | Sequence[str], image_keys: Sequence[str] = IMAGE_KEYS,
                index_cache: Optional[str] = None, skipped: Optional[list[str]] = None) -> ShardTable:
    """The table of the listed shards, in the order listed.

    A directory (or its manifest) with a table for these image keys is read in one file, with no
    stat of any shard: the scalable path. Shards listed one by one (brace patterns) take their
    counts from their directory's table where it lists them; other shards are indexed (scanned
    once and cached), and one that is no tar at all is skipped with a warning."""
    image_keys = tuple(image_keys)
    if not isinstance(shards, str):
        return ShardTable.concat([shard_table(s, image_keys, index_cache, skipped) for s in shards])
    as_path = Path(shards).expanduser()
    directory = as_path if as_path.is_dir() else as_path.parent if as_path.name in (MANIFEST, TABLE) else None
    if directory is not None:
        table = ShardTable.load(directory)
        if table is not None and table.image_keys == image_keys:
            return table
    paths = expand_shards(shards)
    tables: dict[Path, dict[str, tuple[int, int]]] = {}
    rows: list[tuple[Path, int, int]] = []
    for path in paths:
        if path.parent not in tables:
            t = ShardTable.load(path.parent)
            tables[path.parent] = ({} if t is None or t.image_keys != image_keys else
                                   {n.decode(): (int(c), int(b)) for n, c, b in zip(t.names, t.counts, t.sizes)})
        hit = tables[path.parent].get(path.name)
        if hit is None:
            try:
                hit = (len(shard_index(path, image_keys, index_cache)), path.stat().st_size)
            except CorruptSampleError as exc:  # one bad shard of many must not stop a run
                warnings.warn(f"data.source.args.shards: skipping {exc}", stacklevel=3)
                if skipped is not None:
                    skipped.append(str(path))
                continue
        rows.append((path, *hit))
    dirs = sorted({str(p.parent) for p, _, _ in rows})
    where = {d: i for i, d in enumerate(dirs)}
    return ShardTable(dirs, [where[str(p.parent)] for p, _, _ in rows], [p.name for p, _, _ in rows],
                      [c for _, c, _ in rows], [b for _, _, b in rows], image_keys)


class _Members(NamedTuple):
    """One shard's loaded index."""

    keys: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    crcs: np.ndarray  # CRC-32 per member, -1 where the index has none (a header scan, an older index)


class TarShardSource:
    """Random access to the images in webdataset tar shards (``ImageSource`` protocol).

    Holds the ``ShardTable`` (O(shards)); a shard's member index is loaded when the shard is
    first touched and kept in an LRU of ``index_lru`` shards (block shuffle reads a few shards
    at a time, so a handful suffices).

    ``shuffle="block"`` exposes ``shard_sizes`` so that the sampler permutes shards, then
    samples within groups of ``block_shards`` shards: consecutive sample numbers read from a
    few files, and no per-epoch permutation of the whole dataset is held in memory.
    ``shuffle="global"`` samples a full permutation per epoch (fine up to ~10^7 samples; with
    it every read may touch another shard, so the LRU of indexes helps little).

    File handles and loaded indexes are per process: opened lazily, never inherited across a
    fork, dropped when pickled, so DataLoader workers each read with their own.
    """

    max_open_files = 64

    def __init__(self, shards: str | Sequence[str], image_keys: Optional[Sequence[str]] = None,
                 shuffle: str = "block", block_shards: int = 4, index_cache: Optional[str] = None,
                 index_lru: int = 16) -> None:
        if shuffle not in ("block", "global"):
            raise ValueError(f"data.source.args.shuffle: {shuffle!r}; use 'block' or 'global'")
        if block_shards < 1:
            raise ValueError(f"data.source.args.block_shards: must be >= 1, got {block_shards}")
        if index_lru < 1:
            raise ValueError(f"data.source.args.index_lru: must be >= 1, got {index_lru}")
        self.image_keys = tuple(k.lower().lstrip(".") for k in (image_keys or IMAGE_KEYS))
        self.skipped_shards: list[str] = []
        self.table = shard_table(shards, self.image_keys, index_cache, self.skipped_shards).nonempty()
        if self.table.total == 0:
            raise FileNotFoundError(f"data.source.args.shards: no images under keys {', '.join(self.image_keys)} "
                                    f"in the shard(s) from {shards!r}")
        self.shuffle, self.block_shards = shuffle, block_shards
        self.index_cache, self.index_lru = index_cache, index_lru
        self._reset()

    def _reset(self) -> None:
        self._fds: dict[int, int] = {}
        self._members: OrderedDict[int, _Members] = OrderedDict()
        self._stale: set[int] = set()  # shards whose size changed since the table was written
        self._warned_unverified = False
        self._pid = os.getpid()

    # -- ImageSource -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.table.total

    def key(self, index: int) -> str:
        shard, local = self.table.locate(index)
        try:
            keys = self.members(shard).keys
        except OSError:  # the shard went missing or bad since it was indexed: reading it says why
            keys = []
        return keys[local] if local < len(keys) else f"{self.table.names[shard].decode()}#{local}"

    def load(self, index: int) -> Image.Image:
        data = self.read(index)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return to_rgb(img)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise CorruptSampleError(f"{self.shard_path(index)}: member {self.key(index)!r} "
                                     f"does not decode ({type(exc).__name__}: {exc})") from None

    @property
    def shard_sizes(self) -> Optional[np.ndarray]:
        """Images per shard, read by the sampler to block-shuffle (None: global shuffle)."""
        return self.table.counts if self.shuffle == "block" else None

    def shard_path(self, index: int) -> Path:
        """The shard file holding sample ``index``."""
        return self.table.path(self.table.locate(index)[0])

    # -- raw access --------------------------------------------------------------------------
    def read(self, index: int) -> bytes:
        """The member's bytes, exactly as stored."""
        shard, local = self.table.locate(index)
        fd = self._fd(shard)  # first: opening finds a shard that changed since it was indexed
        members = self.members(shard)
        if local >= len(members.keys):
            raise CorruptSampleError(f"{self.table.path(shard)}: holds {len(members.keys)} images now, "
                                     f"{self.table.counts[shard]} when indexed; re-run `python -m radio_core.data "
                                     "index` on its directory")
        offset, size = int(members.offsets[local]), int(members.sizes[local])
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise CorruptSampleError(f"{self.table.path(shard)}: member {members.keys[local]!r} is truncated "
                                     f"({len(data)} of {size} bytes; the shard file is cut short)")
        crc = int(members.crcs[local])
        if crc >= 0 and zlib.crc32(data) != crc:
            raise CorruptSampleError(f"{self.table.path(shard)}: member {members.keys[local]!r} fails its CRC-32 "
                                     "checksum: its bytes changed after the shard was indexed")
        return data

    def members(self, shard: int) -> _Members:
        """A shard's index, from the LRU or loaded (index file, else cached scan)."""
        self._check_pid()
        hit = self._members.get(shard)
        if hit is not None:
            self._members.move_to_end(shard)
            return hit
        path = self.table.path(shard)
        size = None if shard in self._stale else int(self.table.sizes[shard])
        rows = shard_index(path, self.image_keys, self.index_cache, size=size)
        crcs = np.array([m[4] if len(m) > 4 and isinstance(m[4], int) else -1 for m in rows], dtype=np.int64)
        if len(crcs) and (crcs < 0).any() and not self._warned_unverified:  # once per reader, not per shard
            self._warned_unverified = True
            warnings.warn(f"{path}: its index holds no checksums, so its samples are read unverified (and those of "
                          "any other shard indexed so); index the directory again with `python -m radio_core.data "
                          "index` to add them", stacklevel=2)
        entry = _Members([m[0] for m in rows], np.array([m[2] for m in rows], dtype=np.int64),
                         np.array([m[3] for m in rows], dtype=np.int64), crcs)
        if len(self._members) >= self.index_lru:
            self._members.popitem(last=False)
        self._members[shard] = entry
        return entry

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to share
            self._close_all()
            self._reset()

    def _fd(self, shard: int) -> int:
        self._check_pid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= self.max_open_files:  # block shuffle touches few shards at a time
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[shard] = os.open(self.table.path(shard), os.O_RDONLY)
            if os.fstat(fd).st_size != self.table.sizes[shard] and shard not in self._stale:
                warnings.warn(f"{self.table.path(shard)}: {os.fstat(fd).st_size} bytes, {self.table.sizes[shard]} "
                              "when indexed; re-indexing it", stacklevel=3)
                self._stale.add(shard)
                self._members.pop(shard, None)
        return fd

    def _close_all(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_members", "_stale", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self._close_all()


def build_webdataset(shards: str | list[str], image_keys: Optional[list[str]] = None, shuffle: str = "block",
                     block_shards: int = 4, index_cache: Optional[str] = None, index_lru: int = 16) -> TarShardSource:
    """Images in webdataset tar shards (directory, brace pattern or file), random access."""
    return TarShardSource(shards, image_keys, shuffle, block_shards, index_cache, index_lru)


# ---------------------------------------------------------------------------------------
# Hugging Face datasets


class HFDatasetSource:
    """An image column of a Hugging Face ``datasets`` dataset (random access is native).

    Images are decoded here (the column is cast to ``Image(decode=False)``) so that a corrupt
    image raises ``CorruptSampleError`` and is counted, like any other source's.
    """

    def __init__(self, path: Optional[str] = None, name: Optional[str] = None, split: str = "train",
                 image_column: str = "image", key_column: Optional[str] = None, config: Optional[str] = None) -> None:
        if (path is None) == (name is None):
            raise ValueError("data.source.args: give path (a dataset saved with save_to_disk) or name "
                             "(for datasets.load_dataset), not both")
        self.path, self.name, self.split, self.config = path, name, split, config
        self.image_column, self.key_column = image_column, key_column
        self._ds = self._keys = None
        ds = self.dataset
        self._len = len(ds)
        self._prefix = f"{Path(path).name if path else name}/{split}"

    @property
    def dataset(self):
        if self._ds is None:
            self._ds = self._open()
        return self._ds

    def _open(self):
        try:
            import datasets
        except ImportError:
            raise ImportError("data.source: the hf_datasets source needs the `datasets` package: "
                              "pip install 'radio-distill[data]'") from None
        if self.path is not None:
            if not Path(self.path).expanduser().exists():
                raise FileNotFoundError(f"data.source.args.path: no saved dataset at {self.path}")
            ds = datasets.load_from_disk(str(Path(self.path).expanduser()))
        else:
            ds = datasets.load_dataset(self.name, self.config, split=self.split)
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise KeyError(f"data.source.args.split: {self.split!r} not in the dataset (splits: {', '.join(ds)})")
            ds = ds[self.split]
        columns = [self.image_column] + ([self.key_column] if self.key_column else [])
        for field, col in (("image_column", self.image_column), ("key_column", self.key_column)):
            if col is not None and col not in ds.column_names:
                raise KeyError(f"data.source.args.{field}: no column {col!r} (columns: {', '.join(ds.column_names)})")
        if not isinstance(ds.features[self.image_column], datasets.Image):
            raise TypeError(f"data.source.args.image_column: column {self.image_column!r} holds "
                            f"{type(ds.features[self.image_column]).__name__}, not datasets.Image")
        return ds.select_columns(columns).cast_column(self.image_column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return self._len

    def key(self, index: int) -> str:
        if self.key_column:
            if self._keys is None:  # a view without the image column: no image bytes read
                self._keys = self.dataset.select_columns([self.key_column])
            return str(self._keys[int(index)][self.key_column])
        return f"{self._prefix}/{int(index):08d}"

    def load(self, index: int) -> Image.Image:
        cell = self.dataset[int(index)][self.image_column]
        try:
            src = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]
            with Image.open(src) as img:
                img.load()
                return to_rgb(img)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise CorruptSampleError(f"{self._prefix}: row {index} does not decode "
                                     f"({type(exc).__name__}: {exc})") from None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ds": None, "_keys": None}  # each worker memory-maps the arrow files itself


def build_hf_datasets(path: Optional[str] = None, name: Optional[str] = None, split: str = "train",
                      image_column: str = "image", key_column: Optional[str] = None,
                      config: Optional[str] = None) -> HFDatasetSource:
    """An image column of a Hugging Face dataset (save_to_disk folder or hub/local name)."""
    return HFDatasetSource(path, name, split, image_column, key_column, config)
