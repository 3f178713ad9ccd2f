"""SIGTERM / SIGINT ask the run to checkpoint after the step in flight and stop."""
from __future__ import annotations

import signal
from typing import Any

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
        """A signal may reach one rank only; all ranks must checkpoint and stop together."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)
