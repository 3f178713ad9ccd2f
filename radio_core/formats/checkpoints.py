"""Checkpoint folders and run directories on disk: names, listing, checksums, run identity.

A checkpoint is ``OUTPUT_DIR/checkpoints/step_NNNNNNNN/`` holding Accelerate's state files, the
trainer's ``trainer_state.json`` and ``checksums.json`` (SHA-256 of every other file, written
last, before the atomic rename). Anything else in the folder (temp dirs, files a user put
there, ``step_12.bak``) is ignored: never listed, loaded or pruned.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
CHECKSUMS_FILE = "checksums.json"
_NAME = re.compile(r"step_(\d{8,})")

#: what in an output_dir shows that a run lives there (a new run there needs --overwrite).
RUN_ARTIFACTS = ("checkpoints", "export", "metrics.jsonl")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a checkpoint folder name, None for any other name."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories (a ``step_N`` folder holding trainer_state.json), oldest
    first; every other name in the folder is ignored."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if checkpoint_step(p) is not None and p.is_dir() and not p.is_symlink()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path) -> Path:
    """``checksums.json``: SHA-256 and size of every file under ``folder``."""
    folder = Path(folder)
    table = {str(p.relative_to(folder)): {"sha256": _digest(p), "bytes": p.stat().st_size} for p in _files(folder)}
    out = folder / CHECKSUMS_FILE
    tmp = folder / (CHECKSUMS_FILE + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": table}, indent=1))
    os.replace(tmp, out)
    return out


def verify_checksums(folder: Path) -> Optional[str]:
    """None when the files are exactly those ``checksums.json`` lists, each matching; else what
    is wrong, in one line. A checkpoint without the file is never loaded unverified (deleting it
    must not be a way past the check), nor one holding a file the table does not list. (The
    checksums catch damage; what keeps a planted file from running code is that no checkpoint
    file is ever unpickled, see ``radio_core.train.state_files``.)"""
    from ..utils import UserFileError, read_user_json

    folder = Path(folder)
    path = folder / CHECKSUMS_FILE
    if not path.exists() and not path.is_symlink():
        return f"no {CHECKSUMS_FILE}: a checkpoint is never loaded unverified (deleted, or not written by a run)"
    try:
        table = read_user_json(path, "checksums file")["files"]
        assert isinstance(table, dict) and all(isinstance(e, dict) for e in table.values())
    except (UserFileError, KeyError, TypeError, AssertionError):
        return f"{CHECKSUMS_FILE} is unreadable"
    listed = {p for p in folder.rglob("*") if p.name != CHECKSUMS_FILE and not p.is_dir()}
    odd = sorted(str(p.relative_to(folder)) for p in listed if p.is_symlink() or not p.is_file())
    if odd:
        return f"not regular file(s): {', '.join(odd[:3])}"
    present = {str(p.relative_to(folder)) for p in listed}
    missing = sorted(set(table) - present)
    if missing:
        return f"file(s) missing: {', '.join(missing[:3])}"
    extra = sorted(present - set(table))
    if extra:
        return f"file(s) not in {CHECKSUMS_FILE}: {', '.join(extra[:3])} (added after the checkpoint was written)"
    for name, entry in sorted(table.items()):
        p = folder / name
        if p.stat().st_size != entry.get("bytes") or _digest(p) != entry.get("sha256"):
            return f"checksum mismatch for {name} (the file changed after it was written)"
    return None


def run_artifacts(out_dir: Path) -> list[str]:
    """The names in ``out_dir`` that show a run lives there (empty: none)."""
    out_dir = Path(out_dir)
    found = []
    ckpts = out_dir / "checkpoints"
    if ckpts.is_dir() and any(checkpoint_step(p) is not None for p in ckpts.iterdir()):
        found.append("checkpoints/")
    if (out_dir / "export").exists():
        found.append("export/")
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def trim_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows of a per-step JSONL log up to ``last_step`` (a resumed run logs the later
    steps again); atomic. Returns the number of rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            step = None  # a line cut by a kill: never complete, dropped
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped
