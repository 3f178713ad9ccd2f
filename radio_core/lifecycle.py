"""What the process is doing, and how it ends when it is told to stop.

* ``phase(what, plugin)``: a context naming the current phase ("import of plugin 'clip'",
  "forward of teacher 'dino'", "writing the export"...) and the plugin running in it.
* A watchdog thread prints one ``warning:`` line (phase, plugin, where the main thread is) when a
  phase makes no progress for ``RADIO_STALL_TIMEOUT`` seconds (default 600; 0 turns it off), and
  again each further period, so a hanging import, build or forward is never silent.
* ``install()``: SIGTERM and SIGINT raise ``Stopped`` (a BaseException, like KeyboardInterrupt)
  in the main thread, so every phase ends through the command's own error handling, with its
  exit status and one line naming the phase. Before a command's ``main`` is running (while
  modules import) the handlers print that line themselves and exit. The trainer replaces the
  handlers while it trains (it checkpoints first, see ``radio_core.train.signals``).

Stdlib only: it is imported before anything heavy, so even an interrupted import is one line.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional

#: exit statuses of a stopped process (README, "Exit codes")
EXIT_STOPPED_AFTER_CHECKPOINT = 75  # EX_TEMPFAIL: --resume continues
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

_STACK: list[tuple[str, Optional[str], float]] = [("start-up", None, time.monotonic())]
_progress = time.monotonic()
#: set by a command's main() once it handles ``Stopped`` itself
_main_running = False
#: what a stop at this point can be resumed from (the trainer sets it after its last checkpoint)
resumable: Optional[str] = None
#: a stop raised but not yet handled by a command: raised again at the next phase boundary, in
#: case library code swallowed it (some catch BaseException while they import)
_pending: Optional[int] = None


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def phase(what: str, plugin: Optional[str] = None) -> Iterator[None]:
    """Name what the main thread does (for the watchdog and for stop messages)."""
    global _progress
    _redeliver()
    _STACK.append((what, plugin, time.monotonic()))
    _progress = time.monotonic()
    try:
        yield
        _redeliver()
    except BaseException as exc:
        if not hasattr(exc, "radio_phase"):  # the innermost phase an exception left through names it
            try:
                exc.radio_phase = current()
            except AttributeError:  # an exception type without a __dict__
                pass
        raise
    finally:
        _STACK.pop()
        _progress = time.monotonic()


def current() -> str:
    """``what`` (``plugin``) of the innermost phase."""
    what, plugin, _ = _STACK[-1]
    return what + (f" (plugin {plugin})" if plugin else "")


def phase_of(exc: BaseException) -> str:
    """The phase ``exc`` was raised in (the phases it left are closed by now)."""
    return getattr(exc, "radio_phase", None) or current()


def _redeliver() -> None:
    if _pending is not None:
        raise Stopped(_pending)


def stop_message(exc: BaseException) -> tuple[str, int]:
    """(one line, exit status) for a process stopped by ``exc`` (Stopped or KeyboardInterrupt);
    the stop counts as handled."""
    global _pending
    _pending = None
    signum = getattr(exc, "signum", signal.SIGINT)
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    if resumable:
        return f"stopped by {name} while {phase_of(exc)}; {resumable}", EXIT_STOPPED_AFTER_CHECKPOINT
    status = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    return f"stopped by {name} while {phase_of(exc)}; no checkpoint was written", status


def _on_signal(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
    global _pending
    if not _main_running:  # modules still import, nothing of ours is in flight: say so and leave
        message, status = stop_message(Stopped(signum))
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(status)  # (an exception could be swallowed by the importing library)
    _pending = signum
    raise Stopped(signum)


def install() -> None:
    """SIGTERM/SIGINT -> ``Stopped`` (main thread only; elsewhere nothing changes), and the
    watchdog."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    start_watchdog()


@contextlib.contextmanager
def command() -> Iterator[None]:
    """Around a command's main(): it catches ``Stopped`` itself from here on."""
    global _main_running
    install()
    before, _main_running = _main_running, True
    try:
        yield
    finally:
        _main_running = before


# ------------------------------------------------------------------------------ watchdog
_watchdog: Optional[threading.Thread] = None


def stall_timeout() -> float:
    try:
        value = float(os.environ.get("RADIO_STALL_TIMEOUT", "600"))
    except ValueError:
        return 600.0
    return value if value == value and value > 0 else 0.0  # NaN or <= 0: off


def start_watchdog() -> None:
    global _watchdog
    if _watchdog is not None or not stall_timeout():
        return
    _watchdog = threading.Thread(target=_watch, name="radio-watchdog", daemon=True)
    _watchdog.start()


def _where() -> str:
    """The main thread's innermost frame, as ``file:line in function``."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _watch() -> None:
    warned_at = None
    while True:
        timeout = stall_timeout()
        time.sleep(min(1.0, timeout / 4) if timeout else 5.0)
        if not timeout:
            continue
        idle = time.monotonic() - _progress
        if idle < timeout:
            warned_at = None
            continue
        if warned_at is not None and idle - warned_at < timeout:
            continue
        warned_at = idle
        print(f"warning: no progress for {idle:.0f} s while {current()}; still waiting (at {_where()}; "
              "RADIO_STALL_TIMEOUT sets this period)", file=sys.stderr, flush=True)


def heartbeat() -> None:
    """Progress inside a long phase (a training step): resets the watchdog's clock."""
    global _progress
    _redeliver()
    _progress = time.monotonic()
