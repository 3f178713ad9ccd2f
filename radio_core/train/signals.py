"""SIGTERM / SIGINT ask the run to checkpoint after the step in flight and stop."""
from __future__ import annotations

import signal


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
