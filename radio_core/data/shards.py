"""Webdataset tar shards as a random-access image source.

Exact resume, rank partitioning and world-size changes all come from sampling being a pure
function of the global sample number (``radio_core.data``), which needs random access. Tar
shards give it cheaply: a member's bytes sit at a fixed offset in its shard, so an index of
(key, offset, size) per member turns ``load(i)`` into one ``pread``.

* ``pack_folder`` writes an image folder as webdataset shards ``000000.tar ...`` (image bytes
  stored unchanged under their extension key) plus ``manifest.json`` holding that index.
* ``TarShardSource`` reads shards by directory, brace pattern (``/data/{000000..000012}.tar``)
  or file; without a manifest it scans the tar headers once and caches the index.

Memory: the index holds about 20 bytes plus one key string per sample (about 100 bytes per
sample in all); beyond a few hundred million samples, split the data across runs or stages.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .sources import IMAGE_EXTENSIONS, to_rgb

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "radio-distill-shards/1"
INDEX_FORMAT = "radio-distill-shard-index/1"
#: member extensions read as images, in order of preference when a sample has several.
#: Captions (txt, json) and other members are ignored.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")


class CorruptSampleError(OSError):
    """A tar member that cannot be read or decoded. An ``OSError``, so the loader's
    ``AugmentedImages`` flags the sample invalid (counted as a bad image) instead of failing."""


# ---------------------------------------------------------------------------------------
# index of one shard: a member per sample, (key, ext, data offset, data size)


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


def _index_cache_file(path: Path, cache_dir: Optional[str]) -> list[Path]:
    """Where a scanned index may be cached: ``cache_dir``, else next to the shards, else $TMPDIR."""
    name = f"{path.name}.index.json"
    if cache_dir:
        return [Path(cache_dir) / hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16] / name]
    digest = hashlib.sha1(str(path.resolve().parent).encode()).hexdigest()[:16]
    return [path.parent / ".radio_index" / name, Path(tempfile.gettempdir()) / "radio_shard_index" / digest / name]


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def shard_index(path: Path, image_keys: Sequence[str], cache_dir: Optional[str] = None) -> list[list]:
    """A shard's member index from the cache when the shard is unchanged, else by scanning."""
    stamp = _stamp(path)
    candidates = _index_cache_file(path, cache_dir)
    for cached in candidates:
        try:
            data = json.loads(cached.read_text())
        except (OSError, ValueError):
            continue
        if (data.get("format") == INDEX_FORMAT and data.get("stamp") == stamp
                and data.get("image_keys") == list(image_keys)):
            return data["members"]
    members = scan_tar(path, image_keys)
    payload = json.dumps({"format": INDEX_FORMAT, "shard": str(path.resolve()), "stamp": stamp,
                          "image_keys": list(image_keys), "members": members})
    for cached in candidates:  # first writable location wins
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            tmp.write_text(payload)
            os.replace(tmp, cached)  # atomic: ranks scanning at once never read half a file
            break
        except OSError:
            continue
    return members


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
    from tqdm.auto import tqdm

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"pack: image folder not found: {root}")
    if shard_size < 1:
        raise ValueError(f"pack: shard_size must be >= 1, got {shard_size}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"pack: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
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
        for path in tqdm(files, desc="pack", unit="img", disable=not progress, dynamic_ncols=True):
            rel = path.relative_to(root)
            try:
                data = path.read_bytes()
            except OSError as exc:  # one unreadable file must not stop packing a large folder
                unreadable.append(f"{rel}: {exc.strerror or exc}")
                continue
            key = _unique_key(rel, used)
            sources[key] = str(rel)
            sink.write({"__key__": key, path.suffix.lower().lstrip("."): data})
    shards = []
    for fname in finished:
        shard = Path(fname)
        members = scan_tar(shard, IMAGE_KEYS)
        shards.append({"name": shard.name, "count": len(members), "bytes": shard.stat().st_size,
                       "members": [m + [sources[m[0]]] for m in members]})
    manifest = {"format": MANIFEST_FORMAT, "count": sum(s["count"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
                "image_bytes": sum(m[3] for s in shards for m in s["members"]),
                "source": str(root.resolve()), "shard_size": shard_size, "shuffle_seed": shuffle_seed,
                "unreadable": unreadable,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 3),
                "image_keys": list(IMAGE_KEYS), "member_fields": ["key", "ext", "offset", "size", "source_path"],
                "shards": shards}
    write_manifest(out, manifest)
    return manifest


def write_manifest(out: Path, manifest: dict) -> Path:
    path = Path(out) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    # Readable header, one line per shard (a member list per line would run to millions of lines).
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items() if k != "shards")
    shards = ",\n  ".join(json.dumps(s, separators=(",", ":")) for s in manifest["shards"])
    tmp.write_text(f'{{\n{head},\n "shards": [\n  {shards}\n ]\n}}\n')
    os.replace(tmp, path)
    return path


def index_shards(shards: str, image_keys: Sequence[str] = IMAGE_KEYS, progress: bool = True) -> dict:
    """Write ``manifest.json`` for existing shards (made by other tools) in their directory, so
    every later reader gets the index without scanning."""
    from tqdm.auto import tqdm

    paths = expand_shards(shards)
    if len({p.parent for p in paths}) != 1:
        raise ValueError(f"index: shards {shards!r} span several directories; index each directory")
    entries = []
    for p in tqdm(paths, desc="index", unit="shard", disable=not progress, dynamic_ncols=True):
        members = scan_tar(p, image_keys)
        entries.append({"name": p.name, "count": len(members), "bytes": p.stat().st_size, "members": members})
    manifest = {"format": MANIFEST_FORMAT, "count": sum(e["count"] for e in entries),
                "bytes": sum(e["bytes"] for e in entries),
                "image_bytes": sum(m[3] for e in entries for m in e["members"]),
                "source": shards, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "image_keys": list(image_keys),
                "member_fields": ["key", "ext", "offset", "size"], "shards": entries}
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
    if as_path.name == MANIFEST and as_path.is_file():
        return [as_path.parent / s["name"] for s in json.loads(as_path.read_text())["shards"]]
    paths = [Path(u).expanduser() for u in expand_urls(shards)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"data.source.args.shards: shard file(s) not found: {', '.join(missing[:3])}{more}")
    return paths


def _manifest_members(directory: Path, cache: dict) -> dict[str, dict]:
    """name -> manifest entry for the shards listed in ``directory/manifest.json`` (if any)."""
    if directory not in cache:
        entries: dict[str, dict] = {}
        path = directory / MANIFEST
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("format") == MANIFEST_FORMAT:
                    entries = {s["name"]: {**s, "image_keys": data.get("image_keys")} for s in data["shards"]}
            except (OSError, ValueError, KeyError) as exc:
                warnings.warn(f"{path}: unreadable manifest ({exc}); scanning the shards instead", stacklevel=3)
        cache[directory] = entries
    return cache[directory]


class TarShardSource:
    """Random access to the images in webdataset tar shards (``ImageSource`` protocol).

    ``shuffle="block"`` exposes ``shard_sizes`` so that the sampler permutes shards, then
    samples within groups of ``block_shards`` shards: consecutive sample numbers read from a
    few files, and no per-epoch permutation of the whole dataset is held in memory.
    ``shuffle="global"`` samples a full permutation per epoch (fine up to ~10^7 samples).

    File handles are opened lazily in the process that reads, never inherited across a fork,
    and dropped when pickled, so DataLoader workers each read with their own.
    """

    max_open_files = 64

    def __init__(self, shards: str | Sequence[str], image_keys: Optional[Sequence[str]] = None,
                 shuffle: str = "block", block_shards: int = 4, index_cache: Optional[str] = None) -> None:
        if shuffle not in ("block", "global"):
            raise ValueError(f"data.source.args.shuffle: {shuffle!r}; use 'block' or 'global'")
        if block_shards < 1:
            raise ValueError(f"data.source.args.block_shards: must be >= 1, got {block_shards}")
        keys_pref = tuple(k.lower().lstrip(".") for k in (image_keys or IMAGE_KEYS))
        paths = expand_shards(shards)
        manifests: dict[Path, dict] = {}
        self.paths: list[str] = []
        self.skipped_shards: list[str] = []
        counts: list[int] = []
        keys: list[str] = []
        offsets: list[int] = []
        sizes: list[int] = []
        for path in paths:
            entry = _manifest_members(path.parent, manifests).get(path.name)
            if (entry is not None and entry.get("bytes") == path.stat().st_size
                    and tuple(entry.get("image_keys") or ()) == keys_pref):
                members = entry["members"]
            else:  # no manifest, the shard changed since, or other image keys: scan headers (cached)
                try:
                    members = shard_index(path, keys_pref, index_cache)
                except CorruptSampleError as exc:  # one bad shard of many must not stop a run
                    warnings.warn(f"data.source.args.shards: skipping {exc}", stacklevel=2)
                    self.skipped_shards.append(str(path))
                    continue
            if not members:
                continue
            self.paths.append(str(path))
            counts.append(len(members))
            for key, _ext, offset, size, *_ in members:
                keys.append(key)
                offsets.append(offset)
                sizes.append(size)
        if not keys:
            raise FileNotFoundError(f"data.source.args.shards: no images under keys {', '.join(keys_pref)} "
                                    f"in {len(paths)} shard(s) from {shards!r}")
        self.counts = counts
        self.keys = keys
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.shard_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self.shuffle, self.block_shards = shuffle, block_shards
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    # -- ImageSource -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def key(self, index: int) -> str:
        return self.keys[index]

    def load(self, index: int) -> Image.Image:
        data = self.read(index)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return to_rgb(img)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise CorruptSampleError(f"{self.paths[self.shard_of[index]]}: member {self.keys[index]!r} "
                                     f"does not decode ({type(exc).__name__}: {exc})") from None

    @property
    def shard_sizes(self) -> Optional[list[int]]:
        """Images per shard, read by the sampler to block-shuffle (None: global shuffle)."""
        return list(self.counts) if self.shuffle == "block" else None

    # -- raw access --------------------------------------------------------------------------
    def read(self, index: int) -> bytes:
        """The member's bytes, exactly as stored."""
        shard = int(self.shard_of[index])
        offset, size = int(self.offsets[index]), int(self.sizes[index])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise CorruptSampleError(f"{self.paths[shard]}: member {self.keys[index]!r} is truncated "
                                     f"({len(data)} of {size} bytes; the shard file is cut short)")
        return data

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to share
            self._close_all()
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= self.max_open_files:  # block shuffle touches few shards at a time
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def _close_all(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self._close_all()


def build_webdataset(shards: str | list[str], image_keys: Optional[list[str]] = None, shuffle: str = "block",
                     block_shards: int = 4, index_cache: Optional[str] = None) -> TarShardSource:
    """Images in webdataset tar shards (directory, brace pattern or file), random access."""
    return TarShardSource(shards, image_keys, shuffle, block_shards, index_cache)


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
