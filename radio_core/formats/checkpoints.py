"""Layout of a run's checkpoint folder: ``checkpoints/step_NNNNNNNN/`` directories, each complete
once its ``trainer_state.json`` exists (written last, then the folder is renamed into place)."""
from __future__ import annotations

from pathlib import Path

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
