"""A run folder (``output_dir``): who holds it, and what the run wrote there.

* ``.radio.lock``: an exclusive ``flock`` that the run's main process takes before it looks at
  the folder and holds until the run ends (the kernel drops it when the process dies, however
  it dies). A second run on the same folder is refused, naming the holder (pid, host, start time,
  command) that the lock file records. The file itself stays (removing a lock file races with a
  process that is opening it).
* ``run_manifest.json``: every path the run created, relative to the folder, added as the run
  writes it. ``--overwrite`` deletes exactly those and nothing else, so a user's own
  ``export/``, ``report/`` or ``recipe.yaml`` beside a run is never touched; and a run is never
  started where such a file is in the way of what it would write.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

LOCK_FILE = ".radio.lock"
MANIFEST_FILE = "run_manifest.json"
MANIFEST_FORMAT = "radio-distill-run/1"
#: what a run writes at the top of its folder (besides per-rank ``samples_rank<R>.jsonl``)
RUN_OUTPUTS = ("checkpoints", "export", "metrics.jsonl", "tensorboard", "report", "recipe.yaml")


class RunFolderError(ValueError):
    """The folder is held by another run, or holds files a run must not touch."""


# ------------------------------------------------------------------------------------ lock
_HELD: dict[str, list] = {}  # real path -> [fd, count]: one process may take its own lock again


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}


def lock_run_folder(out_dir: Path) -> Path:
    """Take the folder's exclusive lock (creating the folder), or raise RunFolderError naming the
    process that holds it. Taking it again in the same process nests (``unlock_run_folder`` once
    per call)."""
    import fcntl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(out_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        return out_dir / LOCK_FILE
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')} "
               f"({holder.get('command')})") if holder else "another process"
        raise RunFolderError(f"output_dir {out_dir} is in use by another run: {who}; wait for it to end, or "
                             "choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
    _HELD[key] = [fd, 1]
    return path


def unlock_run_folder(out_dir: Path) -> None:
    key = os.path.realpath(out_dir)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        os.close(held[0])  # closing the last descriptor releases the flock


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode(errors="replace") or "{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


# ------------------------------------------------------------------------------ manifest
def read_manifest(out_dir: Path) -> Optional[list[str]]:
    """The paths the run recorded, or None when the folder has no manifest."""
    from ..utils import UserFileError, read_user_json

    path = Path(out_dir) / MANIFEST_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = read_user_json(path, "run manifest")
        written = data["written"]
        assert data.get("format") == MANIFEST_FORMAT and all(isinstance(w, str) for w in written)
    except (UserFileError, KeyError, TypeError, AssertionError):
        raise RunFolderError(f"{path}: not a run manifest; this folder's files were not all written by a run: "
                             "remove them by hand or choose another output_dir") from None
    return [w for w in written if _inside(w)]


def _inside(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def record(out_dir: Path, names: Iterable[str]) -> None:
    """Add ``names`` (relative paths the run just created) to the manifest, atomically."""
    out_dir = Path(out_dir)
    written = read_manifest(out_dir) or []
    new = [n for n in names if n not in written]
    if not new and (out_dir / MANIFEST_FILE).is_file():
        return
    tmp = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "written": written + new}, indent=1))
    os.replace(tmp, out_dir / MANIFEST_FILE)


def forget(out_dir: Path, names: Iterable[str]) -> None:
    """Drop ``names`` from the manifest (the run deleted them itself, e.g. pruned checkpoints)."""
    out_dir = Path(out_dir)
    written = read_manifest(out_dir)
    if written is None:
        return
    gone = set(names)
    tmp = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "written": [w for w in written if w not in gone]},
                              indent=1))
    os.replace(tmp, out_dir / MANIFEST_FILE)


def foreign_outputs(out_dir: Path) -> list[str]:
    """Names a run writes that are present in ``out_dir`` but not in its manifest: a user's own
    files, which a run must neither write into nor delete."""
    out_dir = Path(out_dir)
    listed = set(read_manifest(out_dir) or [])
    found = []
    for name in RUN_OUTPUTS:
        p = out_dir / name
        if (p.exists() or p.is_symlink()) and name not in listed:
            if name == "checkpoints" and not any(w.startswith("checkpoints/") for w in listed) and \
                    not _has_files(p):
                continue  # an empty checkpoints/ folder is in nobody's way
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(True for _ in folder.iterdir())


def remove_recorded(out_dir: Path, say: Any = None) -> list[str]:
    """Delete what the manifest lists (never a symlink's target), then the manifest; folders the
    run created are removed only if nothing else is left in them."""
    out_dir = Path(out_dir)
    written = read_manifest(out_dir) or []
    removed = []
    for rel in sorted(written, key=lambda r: -len(Path(r).parts)):  # deepest first
        p = out_dir / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            if rel in ("checkpoints",):  # the run's container: only if it holds nothing else
                try:
                    p.rmdir()
                except OSError:
                    continue
            else:
                shutil.rmtree(p)
        else:
            continue
        removed.append(rel)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    if say is not None and removed:
        say(f"--overwrite: removed the earlier run's {len(removed)} output(s) in {out_dir} (listed in its "
            f"{MANIFEST_FILE}); nothing else")
    return removed
