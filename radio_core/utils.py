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


def linear_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weight matrices of ``module``'s ``nn.Linear`` layers (under a parametrisation such as
    σReparam, the raw ``original`` weight it is computed from)."""
    return [p for m in module.modules() if isinstance(m, nn.Linear)
            for name, p in m.named_parameters() if name in ("weight", "parametrizations.weight.original")]


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


# ------------------------------------------------------------------------------ weights files
class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and what is wrong."""


def read_safetensors(path: Any, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (no code can run from it), refusing a file that is
    missing, a directory, malformed (a header that lies about shapes, dtypes or offsets) or
    that holds non-finite floats. One WeightsError line naming the file otherwise."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory, not a {what} file")
    if not path.is_file():
        raise WeightsError(f"{path}: {what} file not found")
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: one line naming the file
        raise WeightsError(f"{path}: not a valid safetensors {what} file "
                           f"({short_repr(exc, 200, quote=False)})") from None
    check_finite(state, str(path))
    return state


def check_finite(state: dict[str, torch.Tensor], origin: str) -> None:
    """Every floating tensor finite, or a WeightsError naming the first bad one."""
    bad = [k for k, t in state.items() if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        t = state[bad[0]]
        count = int((~torch.isfinite(t)).sum())
        raise WeightsError(f"{origin}: non-finite values in {len(bad)} tensor(s), e.g. {bad[0]!r} "
                           f"({count} of {t.numel()} NaN/inf)")


def check_dtypes(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], origin: str) -> None:
    """``state`` (from a file) against the tensors of the module it is loaded into: a floating
    tensor must be floating, any other must have the module's dtype, and the floating tensors
    must not mix dtypes (a half-converted file). Raises WeightsError naming an example."""
    float_dtypes: dict[torch.dtype, str] = {}
    for key, t in state.items():
        ref = reference.get(key)
        if ref is None:
            continue
        if ref.is_floating_point():
            if not t.is_floating_point():
                raise WeightsError(f"{origin}: {key!r} holds {str(t.dtype).removeprefix('torch.')} values; "
                                   f"the model expects floating point")
            if ref.dtype == torch.get_default_dtype():  # buffers kept in float64 are their own class
                float_dtypes.setdefault(t.dtype, key)
        elif t.dtype != ref.dtype:
            raise WeightsError(f"{origin}: {key!r} holds {str(t.dtype).removeprefix('torch.')}; the model expects "
                               f"{str(ref.dtype).removeprefix('torch.')}")
    if len(float_dtypes) > 1:
        examples = ", ".join(f"{str(d).removeprefix('torch.')} ({k!r})" for d, k in float_dtypes.items())
        raise WeightsError(f"{origin}: mixed floating dtypes: {examples}; convert the whole file to one dtype")
