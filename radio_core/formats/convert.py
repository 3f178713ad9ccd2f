"""``radio export RUN --format ...``: a trained run's student + heads in another format.

Formats: ``radio-distill`` (this framework's export: ``model.safetensors`` + ``config.json``),
``transformers`` (a directory ``transformers.AutoModel.from_pretrained`` loads, heads beside it;
``radio_core.formats.hf_transformers``), ``radio`` (an official-RADIO-layout ``.pth.tar``) and
``onnx`` (``model.onnx``: the student and every head; ``radio_core.formats.onnx``).
Each output folder gets a model card (``README.md``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..utils import real_path

FORMATS = ("radio-distill", "transformers", "radio", "onnx")


class ExportSourceError(FileNotFoundError):
    """RUN is neither a run directory (with export/ or checkpoints/) nor an export directory."""


def locate(source: str | Path) -> tuple[Optional[Path], Optional[Path]]:
    """(export directory or None, run directory or None) for a run or export path."""
    source = Path(source)
    if (source / "export" / "config.json").is_file():
        return source / "export", source
    if (source / "config.json").is_file():
        run = source.parent if (source.parent / "recipe.yaml").is_file() else None
        return source, run
    if (source / "recipe.yaml").is_file():
        return None, source
    raise ExportSourceError(f"{source}: not a run directory (no recipe.yaml) nor an export directory (no config.json)")


def load_model(source: str | Path, registry=None):
    """(``RadioModel``, run directory or None) of a finished run's export or an export directory."""
    from .radio_model import RadioModel

    export_dir, run_dir = locate(source)
    if export_dir is None:
        raise ExportSourceError(f"{run_dir}: no export/ yet (the trainer writes it when the run finishes, with "
                                f"checkpoint.export: true); finish or resume the run first")
    return RadioModel.load(export_dir, registry=registry), run_dir


def default_output(source: str | Path, fmt: str) -> Path:
    export_dir, run_dir = locate(source)
    base = run_dir if run_dir is not None else export_dir.parent
    name = "export" if fmt == "radio-distill" else f"export_{fmt.replace('-', '_')}"
    out = base / name
    if export_dir is not None and real_path(out) == real_path(export_dir):
        out = base / "export_copy"
    return out


def export_run(source: str | Path, fmt: str = "transformers", out: Optional[str | Path] = None,
               registry=None, resolution: Optional[tuple[int, int]] = None) -> Path:
    """Write the model of ``source`` (run or export directory) in format ``fmt`` to ``out``
    (default: ``RUN/export_<format>``); returns the written directory (or file, for ``radio`` and
    ``onnx``). ``resolution``: the ONNX example input (the only size for fixed-size students)."""
    from .model_card import write_model_card

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    out = Path(out) if out is not None else default_output(source, fmt)
    _check_output(out, fmt)
    model, run_dir = load_model(source, registry=registry)
    if fmt == "transformers":
        model.save_transformers(out)
        write_model_card(out, model.config, run_dir, fmt="transformers")
        return out
    if fmt == "radio":
        file = out if out.name.endswith((".tar", ".pth", ".pt")) else out / "model.pth.tar"
        file.parent.mkdir(parents=True, exist_ok=True)
        model.save_radio(file)
        write_model_card(file.parent, model.config, run_dir, fmt="radio")
        return file
    if fmt == "onnx":
        from .onnx import save_onnx

        file = save_onnx(model, out if out.suffix == ".onnx" else out / "model.onnx", resolution)
        write_model_card(file.parent, model.config, run_dir, fmt="onnx")
        return file
    model.save(out)
    write_model_card(out, model.config, run_dir)
    return out


def _check_output(out: Path, fmt: str) -> None:
    """``--out`` must be a directory or a path that can become one (``radio``: also a file to
    write or replace): an existing file, FIFO, device or symlink loop is one error line."""
    import stat

    from ..utils import UserFileError, stat_user_path

    if not out.exists() and not out.is_symlink():
        return
    try:
        st = stat_user_path(out, "--out")
    except UserFileError as exc:
        raise ExportSourceError(str(exc)) from None
    as_file = fmt == "radio" and out.name.endswith((".tar", ".pth", ".pt"))
    if as_file and not stat.S_ISREG(st.st_mode):
        raise ExportSourceError(f"--out {out}: exists and is not a regular file; give a .pth.tar path to write")
    if not as_file and not stat.S_ISDIR(st.st_mode):
        raise ExportSourceError(f"--out {out}: exists and is not a directory; the {fmt} export is a folder: give a "
                                "new or existing folder")


__all__ = ["export_run", "load_model", "locate", "FORMATS", "ExportSourceError"]


def main(argv=None) -> int:
    import sys

    from ..utils import OneLineParser

    p = OneLineParser(prog="radio export", description=(
        "Write a trained run's student and adaptor heads in another format, with a model card (README.md)."))
    p.add_argument("run", help="a finished run's directory (its export/ is read) or an export directory")
    p.add_argument("--format", choices=FORMATS, default="transformers",
                   help="transformers: a directory transformers.AutoModel loads (heads beside it); radio: an "
                        "official-RADIO .pth.tar; onnx: model.onnx with every head; radio-distill: this "
                        "framework's export (default: transformers)")
    p.add_argument("--out", help="output directory (radio: a .pth.tar path, onnx: a .onnx path, or a directory); "
                                 "default RUN/export_<format>")
    p.add_argument("--resolution", type=int, nargs=2, metavar=("H", "W"),
                   help="onnx: the example input size (the only one for students without dynamic sizes; default "
                        "the run's student resolution)")
    args = p.parse_args(argv)
    from ..registry import PluginError
    from .export import ExportError
    from .hf_transformers import TransformersFormatError

    from ..utils import bounded_message

    try:
        path = export_run(args.run, args.format, args.out, resolution=tuple(args.resolution) if args.resolution else None)
    except (ExportSourceError, ExportError, TransformersFormatError, PluginError, ValueError, OSError) as exc:
        what = exc if not isinstance(exc, OSError) or isinstance(exc, ExportSourceError) else \
            f"cannot write the export: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        print(f"error: {bounded_message(str(what))}", file=sys.stderr)
        return 2
    print(f"{args.format} export written to {path}")
    return 0
