"""The ``radio`` console script: one command per task, each with its own ``--help``.

    radio train | validate | plan | eval | cache | pack | sweep | plugins | export | featsharp

``python -m radio_core.run`` stays the entry point ``accelerate launch -m`` takes (``radio train``
runs the same code). Commands import their module only when run, so ``radio --help`` is fast.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from typing import Callable, Optional, Sequence

#: name -> one-line summary (shown by ``radio --help``)
COMMANDS = {
    "train": "train a student from a recipe (same as python -m radio_core.run)",
    "validate": "check a recipe: schema, plugin names and their arguments, rank partition; builds nothing",
    "plan": "size a run: every model on the meta device, FLOPs and memory per group and rank",
    "eval": "evaluate a run: report, fidelity, resolution sweep, kNN, zero-shot, segmentation",
    "cache": "compute teacher features once for many runs (K fixed views per image)",
    "pack": "pack an image folder into webdataset tar shards with a byte index",
    "sweep": "run an ablation sweep (one run per combination of overrides)",
    "plugins": "list registered teachers, students, adaptors, losses, datasets (--verbose: their arguments)",
    "export": "write a trained model for transformers, the official RADIO loader, or this framework",
    "featsharp": "train a teacher's FeatSharp upsampler (teachers.NAME.upsampler) and save it, fingerprinted",
}


def _recipe_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from .utils import OneLineParser, positive_int

    p = OneLineParser(prog=prog, description=description)
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 teachers.dino.weight=0.5")
    p.add_argument("--world-size", type=positive_int, default=None,
                   help="number of processes to check/plan for (default: this launch's, else 1)")
    return p


def _validate(argv: list[str]) -> int:
    args = _recipe_parser("radio validate", COMMANDS["validate"]).parse_args(argv)
    from .run import main as run_main

    return run_main([args.recipe, *args.overrides, "--validate", *_world(args)])


def _plan(argv: list[str]) -> int:
    parser = _recipe_parser("radio plan", COMMANDS["plan"] + ". Nothing is downloaded; no hub is contacted.")
    from .utils import positive_float

    parser.add_argument("--gpu-memory", type=positive_float, default=None, metavar="GiB",
                        help="memory per GPU to check the estimate against (default: the visible GPU's, else 80)")
    args = parser.parse_args(argv)
    from .run import main as run_main

    gpu = ["--gpu-memory", repr(args.gpu_memory)] if args.gpu_memory is not None else []
    return run_main([args.recipe, *args.overrides, "--dry-run", *_world(args), *gpu])


def _world(args: argparse.Namespace) -> list[str]:
    return ["--world-size", str(args.world_size)] if args.world_size is not None else []


def _with_prog(main: Callable[..., int], argv: list[str], prog: str) -> int:
    """Call a module's ``main(argv)``, naming it ``prog`` in its usage when it accepts that."""
    if "prog" in inspect.signature(main).parameters:
        return main(argv, prog=prog)
    old = sys.argv[0]
    sys.argv[0] = prog  # argparse's default prog
    try:
        return main(argv)
    finally:
        sys.argv[0] = old


def _train(argv: list[str]) -> int:
    from .run import main as run_main

    return _with_prog(run_main, argv, "radio train")


def _eval(argv: list[str]) -> int:
    from .eval.__main__ import main as eval_main

    return _with_prog(eval_main, argv, "radio eval")


def _cache(argv: list[str]) -> int:
    from .data.cache import main as cache_main

    return _with_prog(cache_main, argv, "radio cache")


def _pack(argv: list[str]) -> int:
    from .data.__main__ import main as data_main

    return _with_prog(data_main, ["pack", *argv], "radio")  # its "pack" subcommand: usage "radio pack ..."


def _sweep(argv: list[str]) -> int:
    from .sweep import main as sweep_main

    return _with_prog(sweep_main, argv, "radio sweep")


def _plugins(argv: list[str]) -> int:
    from .plugins import main as plugins_main

    return _with_prog(plugins_main, argv, "radio plugins")


def _export(argv: list[str]) -> int:
    from .formats.convert import main as export_main

    return _with_prog(export_main, argv, "radio export")


def _featsharp(argv: list[str]) -> int:
    from .train.featsharp import main as featsharp_main

    return _with_prog(featsharp_main, argv, "radio featsharp")


HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "train": _train, "validate": _validate, "plan": _plan, "eval": _eval, "cache": _cache, "pack": _pack,
    "sweep": _sweep, "plugins": _plugins, "export": _export, "featsharp": _featsharp,
}


#: name -> its main arguments (the first line of ``radio --help`` per command)
SYNOPSIS = {
    "train": "RECIPE [overrides] [--resume | --overwrite]", "validate": "RECIPE [overrides] [--world-size N]",
    "plan": "RECIPE [overrides] [--world-size N] [--gpu-memory GiB]", "eval": "RUN_DIR TASK [--data DIR] [--json]",
    "cache": "RECIPE [--views K] [--out DIR]", "pack": "FOLDER OUT [--shard-size N]",
    "sweep": "SWEEP.yaml [--only NAME] [--dry-run] [--status]", "plugins": "[--kind KIND] [--verbose] [NAME ...]",
    "export": "RUN [--format transformers|radio|radio-distill] [--out DIR]",
    "featsharp": "RECIPE --teacher NAME [--steps N] [--out FILE] [overrides]",
}


def usage() -> str:
    lines = ["usage: radio COMMAND [ARGS]   (radio COMMAND --help for a command's options)", "",
             "Agglomerative multi-teacher distillation (AM-RADIO style).", "", "commands:"]
    for c, text in COMMANDS.items():
        lines += [f"  {c} {SYNOPSIS[c]}", f"      {text}"]
    lines += ["", "Multi-process training: accelerate launch -m radio_core.run RECIPE [overrides]"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. SIGTERM and Ctrl-C, in any phase (imports included), end it with one
    ``error:`` line naming the phase and the status of README's table."""
    from . import lifecycle

    with lifecycle.command():
        try:
            return _dispatch(list(sys.argv[1:] if argv is None else argv))
        except (KeyboardInterrupt, lifecycle.Stopped) as exc:
            message, status = lifecycle.stop_message(exc)
            print(f"error: {message}", file=sys.stderr, flush=True)
            return status


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"radio-distill {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    handler = HANDLERS.get(cmd)
    if handler is None:
        from .utils import closest

        guess = closest(cmd, COMMANDS)
        hint = f" Did you mean {guess!r}?" if guess else ""
        print(f"radio: unknown command {cmd!r}.{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    return handler(rest)


if __name__ == "__main__":
    sys.exit(main())
