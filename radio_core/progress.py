"""Progress of long work, with an estimate of what is left (tqdm).

One helper for every loop that runs long (training, ``radio eval`` tasks, ``radio cache``,
``radio pack``, feature extraction)::

    bar = progress(total=len(images), desc="features", unit="img")
    for ...:
        bar.update(len(batch))
    bar.close()

On a terminal it is tqdm's live bar (rate and ETA). When the stream is not a terminal (a log
file, a CI job, a SLURM output file) a live bar would write carriage returns into the file, so
the helper writes whole lines instead: one every ``every_s`` seconds and one at the end, or,
with ``every_s=None``, one each time the caller asks (``line()``; training does at its logging
steps). ``enabled=False`` (the recipe's ``logging.progress``) or ``RADIO_PROGRESS=0`` in the
environment silences it; ``RADIO_PROGRESS=lines`` forces lines on a terminal too.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, TextIO

#: the line written when the stream is not a terminal: no bar, the numbers only
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class _Discard:
    """A file that drops what tqdm writes: in line mode tqdm only keeps the counts and rates."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _env_setting() -> str:
    return os.environ.get("RADIO_PROGRESS", "").strip().lower()


class Progress:
    """A tqdm bar (terminal) or a line writer (anything else); see the module docstring."""

    def __init__(self, total: Optional[float] = None, desc: str = "", unit: str = "it", initial: int = 0,
                 enabled: bool = True, stream: Optional[TextIO] = None, every_s: Optional[float] = 30.0) -> None:
        from tqdm.auto import tqdm

        self.stream = stream if stream is not None else sys.stderr
        setting = _env_setting()
        self.enabled = enabled and setting not in ("0", "off", "false", "no")
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.live = self.enabled and setting != "lines" and bool(isatty())
        self.every_s = every_s
        self._last_line, self._lines_at = time.monotonic(), initial
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not self.enabled,
                        file=self.stream if self.live else _Discard(), dynamic_ncols=self.live,
                        mininterval=0.5 if self.live else 1e9)

    @property
    def n(self) -> float:
        return self.bar.n

    def update(self, n: float = 1) -> None:
        self.bar.update(n)
        if (self.enabled and not self.live and self.every_s is not None
                and time.monotonic() - self._last_line >= self.every_s):
            self.line()

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(values, refresh=self.live)

    def set_postfix_str(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=self.live)

    def set_description(self, desc: str) -> None:
        self.bar.set_description(desc, refresh=self.live)

    def line(self) -> None:
        """Write the current state as one line (line mode only; a live bar shows it already)."""
        if not self.enabled or self.live:
            return
        fmt = dict(self.bar.format_dict)
        fmt["bar_format"] = LINE_FORMAT if fmt.get("total") else LINE_FORMAT_NO_TOTAL
        fmt["ncols"] = None
        self.stream.write(self.bar.format_meter(**fmt) + "\n")
        self.stream.flush()
        self._last_line, self._lines_at = time.monotonic(), self.bar.n

    def write(self, message: str) -> None:
        """Print a message without breaking a live bar."""
        if self.live:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and not self.live and self.bar.n != self._lines_at:
            self.line()  # the final count, rate and time
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: Optional[float] = None, desc: str = "", unit: str = "it", initial: int = 0,
             enabled: bool = True, stream: Optional[TextIO] = None, every_s: Optional[float] = 30.0) -> Progress:
    """A progress display for ``total`` units of work; see the module docstring."""
    return Progress(total, desc, unit, initial, enabled, stream, every_s)


def iterate(items: Any, desc: str = "", unit: str = "it", total: Optional[float] = None, **kwargs: Any):
    """``for x in iterate(items, "pack", "img"): ...`` with a progress display."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with progress(total, desc, unit, **kwargs) as bar:
        for item in items:
            yield item
            bar.update(1)


__all__ = ["Progress", "progress", "iterate", "LINE_FORMAT"]
