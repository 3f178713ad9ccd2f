"""What a run reports: losses reduced over ranks, the JSONL/TensorBoard log, the progress bar,
and the count of unreadable images."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def reduce_losses(accelerator: Any, terms: dict[str, Tensor], teachers: list[str]) -> dict[str, float]:
    """Mean of each loss over the ranks that computed it (teachers differ per rank)."""
    # "kept": the share of images a balancer (``balance``) kept for the teacher
    keys = ["total", "mesa"] + [f"{t}/{h}" for t in teachers for h in ("summary", "spatial", "kept")]
    values = torch.zeros(2, len(keys), device=accelerator.device)
    for i, k in enumerate(keys):
        if k in terms:
            values[0, i], values[1, i] = terms[k].float(), 1.0
    values = accelerator.reduce(values, "sum")
    out = {f"loss/{k}": float(values[0, i] / values[1, i]) for i, k in enumerate(keys) if values[1, i] > 0}
    # Rank 0's optimiser scalars are the same everywhere.
    for k in ("grad_norm", "lr"):
        if k in terms:
            out[k] = float(terms[k])
    return out


class BadDataError(RuntimeError):
    """More than ``data.max_bad_fraction`` of the samples could not be decoded."""


class BadImageCounter:
    """Unreadable images seen by this rank, summed over ranks when logged or checkpointed; too
    many of them stop the run (``check``)."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.base, self.local = 0, 0  # base: the count a resumed run started from
        self.examples: list[str] = []  # the first few on this rank, for the stop message

    def count(self, batches: list[dict]) -> None:
        for b in batches:
            bad = int((~b["valid"]).sum())
            if bad:
                self.local += bad
                for e in b["errors"]:
                    if len(self.examples) < 3:
                        self.examples.append(e)
                    self.accelerator.print(f"skipped unreadable image: {e}")

    def total(self) -> int:
        local = torch.tensor([float(self.local)], device=self.accelerator.device)
        return self.base + int(self.accelerator.reduce(local, "sum").item())

    def check(self, bad: int, seen: int, limit: float, step: int) -> None:
        """Stop when more than ``limit`` of the ``seen`` samples are bad, judged over at least
        1000 samples (a few bad files early on do not stop a run). ``bad`` is the all-rank total,
        so every rank stops at the same step."""
        if bad > limit * max(seen, 1000):
            examples = "; ".join(self.examples) or "(on other ranks)"
            raise BadDataError(f"{bad} of {seen} samples ({bad / max(seen, 1):.1%}) could not be decoded, more than "
                               f"data.max_bad_fraction={limit:g}; stopping at step {step} without an export. "
                               f"Examples: {examples}")


class MetricsLogger:
    """JSONL file + TensorBoard, on the main process only."""

    def __init__(self, out_dir: Path, spec: Any, enabled: bool) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        if spec.jsonl:
            self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if spec.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def progress_bar(start: int, total: int, enabled: bool):
    """Steps with rate and ETA (``radio_core.progress``): a live bar on a terminal, else one
    line per logging step (the loop calls ``line()`` there)."""
    from ..progress import progress

    return progress(total, "distill", "step", initial=start, enabled=enabled, every_s=None)
