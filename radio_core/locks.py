"""An exclusive file lock that says what a waiter waits for and who holds it.

``flock`` on ``PATH`` (released by the kernel when the holder exits or dies, so a crash never
leaves it held); the holder writes ``PATH.holder.json`` (pid, host, command, what, since) beside
it, which a waiter reads to tell the user::

    with file_lock(cache_dir / ".lock", "the proxy SAM teacher (trains it once, then cached)"):
        ...

prints, when another process holds it::

    waiting for the proxy SAM teacher (...): held by pid 4121 on node7 since 12:01:07 (2 min),
    command: radio train recipes/quickstart.yaml

and again every ``report_every_s`` seconds while the wait lasts.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional


class LockTimeout(TimeoutError):
    """The lock stayed held for longer than the caller would wait; the message names the holder."""


def holder_path(path: Path) -> Path:
    return path.with_name(path.name + ".holder.json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(path: str | Path) -> str:
    """Who holds ``path`` according to its sidecar, in words ("holder unknown" without one)."""
    side = holder_path(Path(path))
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError):
        return "holder unknown (it has not written " + side.name + ")"
    pid, host = info.get("pid"), info.get("host", "?")
    since = info.get("since")
    age = ""
    if isinstance(since, (int, float)):
        secs = max(0, time.time() - since)
        age = f" since {time.strftime('%H:%M:%S', time.localtime(since))} ({_duration(secs)})"
    text = f"held by pid {pid} on {host}{age}"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        text += " (that process has exited; the lock is being taken over)"
    if info.get("command"):
        text += f", command: {info['command']}"
    return text


def _duration(secs: float) -> str:
    if secs < 90:
        return f"{secs:.0f} s"
    if secs < 5400:
        return f"{secs / 60:.0f} min"
    return f"{secs / 3600:.1f} h"


def _write_holder(path: Path, what: str) -> dict:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
            "what": what, "since": time.time()}
    side = holder_path(path)
    tmp = side.with_name(side.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(side)
    return info


def _remove_holder(path: Path, info: dict) -> None:
    side = holder_path(path)
    try:
        saved = json.loads(side.read_text())
        if (saved.get("pid"), saved.get("since")) == (info["pid"], info["since"]):  # still ours
            side.unlink()
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def file_lock(path: str | Path, what: str, timeout: Optional[float] = None, poll_s: float = 0.5,
              report_every_s: float = 60.0, notify: Optional[Callable[[str], None]] = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    ``what``: what the lock guards, in words, for the waiting message. ``timeout``: seconds to
    wait before LockTimeout (None: as long as it takes). ``notify``: where messages go (default:
    one line on stderr)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    say = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
    handle = open(path, "a+")
    try:
        start = time.monotonic()
        last_report: Optional[float] = None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if timeout is not None and now - start >= timeout:
                    raise LockTimeout(f"gave up after {timeout:g} s waiting for {what} ({path}): "
                                      f"{describe_holder(path)}") from None
                if last_report is None or now - last_report >= report_every_s:
                    waited = f" (waited {_duration(now - start)})" if last_report is not None else ""
                    say(f"waiting for {what}{waited}: {describe_holder(path)} [lock {path}]")
                    last_report = now
                time.sleep(poll_s)
        if last_report is not None:
            say(f"got {what} after {_duration(time.monotonic() - start)}")
        info = _write_holder(path, what)
        try:
            yield path
        finally:
            _remove_holder(path, info)
    finally:
        handle.close()  # releases the flock


__all__ = ["file_lock", "describe_holder", "holder_path", "LockTimeout"]
