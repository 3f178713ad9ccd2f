"""SIGTERM / SIGINT ask the run to checkpoint after the step in flight and stop."""
from __future__ import annotations

import signal
from typing import Any, Optional

import torch


class StopSignals:
    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def request(self) -> None:
        self.requested = True

    def install(self) -> None:
        def on_signal(signum, frame):  # noqa: ARG001
            # Launchers often deliver SIGTERM twice (to the process and its group): only a
            # second Ctrl-C means "give up without the checkpoint".
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, on_signal)
            except ValueError:  # not in the main thread
                pass

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def requested_anywhere(self, accelerator: Any) -> bool:
        """A signal may reach one rank only; all ranks must checkpoint and stop together. The
        flag is reduced over a CPU (gloo) group: the step does not wait for the GPU."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=host_group())
        return bool(flag[0] > 0)


_HOST_GROUP: list = []


def host_group() -> Optional[Any]:
    """A gloo group over every rank (None: the default group is gloo already). Made on first use,
    which every rank reaches at the same step."""
    import torch.distributed as dist

    if not _HOST_GROUP:
        _HOST_GROUP.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]
