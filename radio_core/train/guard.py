"""The non-finite guard of a training step, and the one small tensor each step hands the host.

A step whose objective is not finite (on any rank) never updates the weights. How it is
skipped decides whether the step waits for the device:

* **on the device** (no host sync): the optimiser is torch's fused AdamW (``optim.fused``, the
  default where torch has the kernel), which takes a ``found_inf`` flag and then leaves weights,
  moments and step counts as they were: torch's GradScaler skips steps the same way. MESA's EMA
  is then moved by ``1 - decay`` times "the step was applied".
* **on the host**: any other optimiser (or fp16 with a loss scaler, which owns ``found_inf``)
  reads the flag before it steps: one host sync per step.

Either way the step's record (every loss term, the flag, the student's finite flag) is copied
to the host without blocking and read one step later (``drain(keep=1)``), or at once where a
logging step, a checkpoint or the end of training needs exact counts (``drain()``): the
"step skipped" messages and the stop after ``max_nonfinite_steps`` in a row come a step late,
never the update they guard. On several ranks the flag is all-reduced (max) on the device:
every rank skips the same steps (one rank's non-finite loss reaches every rank's gradients).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .state_files import raw_optimizer

#: positions of the flags at the end of a record
NONFINITE, STUDENT_FINITE = -2, -1


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class _Record:
    step: int
    keys: list[str]
    values: Tensor  # on the host once ``ready`` (terms..., non-finite on any rank, student finite)
    ready: Any  # a CUDA event, or None when the copy was synchronous


def skips_on_device(optimizer: Any, accelerator: Any) -> bool:
    """Whether ``optimizer`` takes a ``found_inf`` flag (torch's fused Adam/AdamW) and no loss
    scaler owns it."""
    opt = raw_optimizer(optimizer)
    return (getattr(accelerator, "scaler", None) is None and isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))
            and all(g.get("fused") for g in opt.param_groups))


class StepGuard:
    """``state``: the trainer's counters (learned, skipped and in-a-row steps), kept exact by
    ``drain``; ``skip``: train.skip_nonfinite; ``limit``: train.max_nonfinite_steps."""

    def __init__(self, accelerator: Any, state: Any, skip: bool, limit: int, student_name: str) -> None:
        self.accelerator, self.state, self.skip, self.limit = accelerator, state, skip, limit
        self.student_name = student_name
        self.pending: list[_Record] = []
        self._dist = accelerator.num_processes > 1

    def nonfinite(self, total: Tensor) -> Tensor:
        """0-d float on the device: 1 where the objective is not finite on any rank, else 0."""
        flag = (~torch.isfinite(total.detach())).float()
        if self._dist:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag

    def record(self, step: int, terms: dict[str, Tensor], nonfinite: Tensor, student_finite: Optional[Tensor]) -> None:
        """Queue the step's record for the host (no sync)."""
        keys = [k for k, v in terms.items() if isinstance(v, Tensor) and v.numel() == 1]
        ok = nonfinite.new_ones(()) if student_finite is None else student_finite.float()
        values = torch.stack([terms[k].detach().float().reshape(()) for k in keys] + [nonfinite, ok])
        ready = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            values = host
        elif values.device.type != "cpu":
            values = values.cpu()
        self.pending.append(_Record(step, keys, values, ready))

    def drain(self, keep: int = 0) -> None:
        """Read every record but the newest ``keep``: update the counters, report skipped steps,
        raise NonFiniteLossError after ``limit`` in a row."""
        while len(self.pending) > keep:
            rec = self.pending.pop(0)
            if rec.ready is not None:
                rec.ready.synchronize()
            self._read(rec)

    def _read(self, rec: _Record) -> None:
        values = rec.values.tolist()
        state, objective = self.state, values[rec.keys.index("total")]
        if not (self.skip and values[NONFINITE] > 0):
            state.learned_steps += int(math.isfinite(objective) and objective != 0)
            state.nonfinite_in_row = 0
            return
        state.skipped_steps += 1
        state.nonfinite_in_row += 1
        bad = [k for k, v in zip(rec.keys, values) if k not in ("total", "grad_norm") and not math.isfinite(v)]
        if values[STUDENT_FINITE] == 0:  # the student, not a teacher or a loss
            bad.insert(0, f"the student {self.student_name!r}, whose outputs were non-finite")
        if not bad and math.isfinite(objective):
            bad = ["another rank's terms"]
        where = ", ".join(bad) or "total"
        self.accelerator.print(f"step {rec.step}: non-finite loss from {where}; step skipped "
                               f"({state.nonfinite_in_row} in a row)")
        if state.nonfinite_in_row >= self.limit:
            self.pending.clear()
            raise NonFiniteLossError(
                f"{state.nonfinite_in_row} non-finite losses in a row (from {where}); "
                "stopping. Lower optim.lr or enable train.grad_clip; the last checkpoint is intact.")
