"""Small helpers shared across the core."""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Optional

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
    if not path.exists() and not path.is_symlink():
        raise WeightsError(f"{path}: {what} file not found")
    try:
        check_user_file(path, f"{what} file", None)  # a FIFO, a device, a symlink loop: refused, never read
    except UserFileError as exc:
        raise WeightsError(str(exc)) from None
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


# ------------------------------------------------------------------------ files a user names
class UserFileError(ValueError):
    """A path that is not what it should be (missing, a FIFO, a device, a symlink loop, too
    large, a directory where a file was meant...); the message is one line naming it."""


#: the largest small file (JSON, YAML, text) the project reads whole unless told otherwise.
MAX_TEXT_BYTES = 64 << 20


def _shown(path: Any) -> str:
    return short_repr(str(path), 200, quote=False)


def _file_kind(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def real_path(path: Any) -> Path:
    """The absolute path with symlinks followed, like ``Path.resolve()`` but never raising: a
    symlink loop stays as far as it resolved (Python 3.11's ``resolve`` raises RuntimeError), so
    the read that follows reports it as one UserFileError line naming the file."""
    return Path(os.path.realpath(path))


def stat_user_path(path: Any, what: str = "file") -> "os.stat_result":
    """``os.stat`` (symlinks followed) with every failure one UserFileError line naming ``path``:
    missing, a NUL byte in the name, a symlink loop, a name too long, no permission."""
    import errno

    shown = _shown(path)
    try:
        return os.stat(path)
    except ValueError:  # "embedded null byte"
        raise UserFileError(f"{what} path {shown} contains a NUL byte") from None
    except FileNotFoundError:
        raise UserFileError(f"{shown}: {what} not found") from None
    except OSError as exc:
        why = {errno.ELOOP: "a symlink loop (too many levels of symbolic links)",
               errno.ENAMETOOLONG: "the path is too long", errno.EACCES: "permission denied",
               errno.ENOTDIR: "a part of the path is not a directory"}.get(exc.errno, exc.strerror or str(exc))
        raise UserFileError(f"{shown}: cannot use this {what}: {why}") from None


def check_user_file(path: Any, what: str = "file", max_bytes: Optional[int] = MAX_TEXT_BYTES) -> "os.stat_result":
    """``path`` must be a regular file (after symlinks) of at most ``max_bytes``: never a FIFO
    (reading it would hang), a device (``/dev/zero`` never ends), a directory or a symlink loop.
    Returns its stat; raises UserFileError (one line naming the file) otherwise."""
    import stat

    st = stat_user_path(path, what)
    shown = _shown(path)
    if not stat.S_ISREG(st.st_mode):
        raise UserFileError(f"{shown}: {what} is {_file_kind(st.st_mode)}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UserFileError(f"{shown}: {what} is {st.st_size} bytes, larger than the {max_bytes} this project "
                            f"reads; not a {what}")
    return st


def check_user_dir(path: Any, what: str = "directory") -> "os.stat_result":
    """``path`` must be a directory (after symlinks); one UserFileError line otherwise."""
    import stat

    st = stat_user_path(path, what)
    if not stat.S_ISDIR(st.st_mode):
        raise UserFileError(f"{_shown(path)}: {what} is {_file_kind(st.st_mode)}, not a directory")
    return st


def read_user_file(path: Any, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (``check_user_file``), opened without
    blocking and checked again on the open descriptor (a file swapped for a FIFO in between is
    refused too), read no further than ``max_bytes`` (a file that grows is refused)."""
    import stat

    check_user_file(path, what, max_bytes)
    shown = _shown(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise UserFileError(f"{shown}: cannot read this {what}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserFileError(f"{shown}: {what} is not a regular file")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise UserFileError(f"{shown}: cannot read this {what}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise UserFileError(f"{shown}: {what} is larger than the {max_bytes} bytes this project reads")
    return data


def read_user_text(path: Any, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """``read_user_file`` decoded as UTF-8 (one UserFileError line if it is not)."""
    try:
        return read_user_file(path, what, max_bytes).decode("utf-8")
    except UnicodeDecodeError:
        raise UserFileError(f"{_shown(path)}: {what} is not UTF-8 text") from None


def read_user_json(path: Any, what: str = "JSON file", max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """The parsed content of a JSON file (``read_user_text``); malformed JSON, numbers too long
    to convert and nesting too deep are one UserFileError line naming the file."""
    import json

    data = read_user_file(path, what, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, int digit limit
        raise UserFileError(f"{_shown(path)}: {what} is not valid JSON "
                            f"({short_repr(exc, 160, quote=False)})") from None


def read_user_jsonl(path: Any, what: str = "JSON-lines file", max_bytes: int = MAX_TEXT_BYTES) -> list[dict]:
    """The JSON objects of a JSON-lines log (``read_user_text``), one per line; lines that are
    not JSON objects (cut by a kill, or garbage) are skipped, never an error."""
    import json

    rows = []
    for line in read_user_text(path, what, max_bytes).splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ------------------------------------------------------------------------ command lines
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error:`` line (exit status 2), like every other
    refusal, instead of a usage block."""

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 of at most 18 digits."""
    value = text.strip()
    if not value.isdigit() or len(value) > 18 or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {short_repr(text, 40)}")
    return int(value)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (of a sane length)."""
    import math

    try:
        value = float(text) if len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {short_repr(text, 40)}")
    return value


def safetensors_from_legacy_pickle(pickle_path: Any, safetensors_path: Any) -> bool:
    """Convert, once, a state-dict pickle that an earlier version of this project wrote into one
    of its own caches into safetensors beside it (read from then on: the cache is never unpickled
    again; the pickle stays for older versions sharing the cache). The one read uses torch's
    restricted ``weights_only`` unpickler (tensors and plain containers only). True when a
    conversion happened."""
    from pathlib import Path

    from safetensors.torch import save_file

    pickle_path, safetensors_path = Path(pickle_path), Path(safetensors_path)
    if safetensors_path.is_file() or not pickle_path.is_file():
        return False
    check_user_file(pickle_path, "cached weights", None)
    state = torch.load(pickle_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{pickle_path}: not a state dict; delete it to rebuild the cache entry")
    check_finite(state, str(pickle_path))
    tmp = safetensors_path.with_name(f".{safetensors_path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, safetensors_path)
    return True
