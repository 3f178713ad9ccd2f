"""Small helpers shared across the core."""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch
from torch import nn


def module_fingerprint(module: nn.Module, extra: Iterable[Any] = ()) -> str:
    """A short hash of a module's parameters/buffers (names, shapes, values) and ``extra``."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    h.update(repr(tuple(extra)).encode())
    return h.hexdigest()[:16]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def closest(name: str, options: Iterable[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return match[0] if match else None


#: Exit status of a run stopped by SIGTERM/SIGINT after writing its checkpoint (EX_TEMPFAIL):
#: "requeue me with --resume". Sweep launchers requeue on it; schedulers can too.
EXIT_PREEMPTED = 75


#: the longest error message the CLI prints, and the longest value quoted inside one.
MAX_MESSAGE_CHARS = 2000
MAX_MESSAGE_LINES = 12


def short_repr(value: Any, limit: int = 80, quote: bool = True) -> str:
    """``repr(value)`` (or ``str`` with ``quote=False``) cut to ``limit`` characters, one line."""
    try:
        text = repr(value) if quote else str(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still named
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 5] + "[...]"


def bounded_message(message: str) -> str:
    """An error message cut to ``MAX_MESSAGE_LINES`` lines of at most ``MAX_MESSAGE_CHARS`` in
    all, whatever the input that caused it contains."""
    lines = str(message).splitlines() or [""]
    extra = len(lines) - MAX_MESSAGE_LINES
    lines = lines[:MAX_MESSAGE_LINES]
    per_line = max(80, MAX_MESSAGE_CHARS // len(lines))
    lines = [ln if len(ln) <= per_line else ln[: per_line - 5] + "[...]" for ln in lines]
    if extra > 0:
        lines.append(f"... and {extra} more problem(s)")
    return "\n".join(lines)
