"""Train a student from a recipe.

    radio train RECIPE.yaml [key.path=value ...] [--resume]
    python -m radio_core.run RECIPE.yaml [overrides ...]          (the same)
    accelerate launch -m radio_core.run RECIPE.yaml [overrides ...]
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m radio_core.run: stop signals are one line from the first import on
    from radio_core import lifecycle as _lifecycle

    _lifecycle.install()

import argparse
import os
import sys
from typing import Optional, Sequence

from . import lifecycle
from .utils import EXIT_PREEMPTED, OneLineParser, positive_float, positive_int


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "radio_core.run") -> argparse.Namespace:
    p = OneLineParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # `radio validate` and `radio plan` are their own commands; `radio train --help` omits them
    hidden = prog != "radio_core.run"
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 teachers.dino.weight=0.5")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds one, removing that run's outputs")
    p.add_argument("--output-dir", help="shorthand for the override output_dir=...")
    p.add_argument("--validate", action="store_true", help=argparse.SUPPRESS if hidden else
                   "check the recipe, plugin names and arguments, then exit (radio validate)")
    p.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS if hidden else
                   "build every model on the meta device and print FLOPs and memory per group and rank (radio plan)")
    p.add_argument("--world-size", type=positive_int, default=None, help=argparse.SUPPRESS if hidden else
                   "number of processes to plan for with --dry-run (default: this launch's)")
    p.add_argument("--gpu-memory", type=positive_float, default=None, metavar="GiB",
                   help=argparse.SUPPRESS if hidden else
                   "memory per GPU to check the --dry-run estimate against (default: the visible GPU's, else 80)")
    return p.parse_intermixed_args(argv)  # overrides may follow the flags


#: exit statuses (README "Exit codes"): 0 done; 1 internal error; 2 refused before training
#: (recipe, plugin, export, resume); 3 failed during training; 75 (EX_TEMPFAIL) stopped by
#: SIGTERM/SIGINT after writing a checkpoint: requeue it with --resume.
EXIT_OK, EXIT_INTERNAL, EXIT_REFUSED, EXIT_FAILED, EXIT_STOPPED = 0, 1, 2, 3, EXIT_PREEMPTED


def error(exc: BaseException | str) -> None:
    """Print ``error: ...`` (one line per problem, bounded in size) to stderr."""
    from .utils import bounded_message

    print(f"error: {bounded_message(str(exc))}", file=sys.stderr, flush=True)


def warn_plugin_problems(registry) -> None:
    for f in registry.failures:
        print(f"warning: plugin {f.entry_point!r} from distribution {f.distribution!r} failed to load "
              f"({f.error}); nothing it provides is available", file=sys.stderr)
    for kind, name, _ in registry.conflicts:
        print(f"warning: {registry.conflict_message(kind, name)}", file=sys.stderr)
    for w in registry.warnings:
        print(f"warning: {w}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None, prog: str = "radio_core.run") -> int:
    """Exit status as documented above; every failure is one ``error:`` line, no traceback
    (set RADIO_TRACEBACK=1 to see one for an internal error)."""
    with lifecycle.command():
        try:
            args = parse_args(argv, prog)
            if os.environ.get("RANK", "0") == "0":
                warning = launch_warning(argv=sys.argv[1:] if argv is None else list(argv))
                if warning:
                    print(f"warning: {warning}", file=sys.stderr, flush=True)
            return _main(args)
        except (KeyboardInterrupt, lifecycle.Stopped) as exc:  # in any phase: its name, one line
            message, status = lifecycle.stop_message(exc)
            error(message)
            return status
        except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            if os.environ.get("RADIO_TRACEBACK"):
                raise
            error(f"internal error: {type(exc).__name__}: {exc} (set RADIO_TRACEBACK=1 for the traceback)")
            return EXIT_INTERNAL


def _main(args: argparse.Namespace) -> int:
    from .plan.checks import check_recipe
    from .recipe import RecipeError, load_recipe
    from .registry import PluginError, get_registry

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    from .formats.release import ReleaseError, resolve_release

    try:
        with lifecycle.phase("reading the recipe"):
            recipe = load_recipe(args.recipe, overrides)
        registry = get_registry()
        warn_plugin_problems(registry)
        world = args.world_size or _launch_world_size()
        with lifecycle.phase("checking the recipe"):
            check_recipe(recipe, registry, world_size=world, origin=args.recipe)
        if args.validate:  # the recipe's own fields: a released model (student.init) is not read
            print(f"{args.recipe}: OK ({len(recipe.teachers)} teachers: {', '.join(recipe.teachers)})")
            return EXIT_OK
        if recipe.student.init is not None:  # the released architecture, checked as the recipe's
            with lifecycle.phase("reading the released model (student.init)"):
                recipe = resolve_release(recipe, registry)
                check_recipe(recipe, registry, world_size=world, origin=args.recipe)
    except (RecipeError, PluginError, ReleaseError) as exc:
        error(exc)
        return EXIT_REFUSED
    if args.dry_run:
        from .plan.planner import dry_run

        try:
            print(dry_run(recipe, registry, world, args.gpu_memory))
        except (RecipeError, PluginError, ValueError) as exc:
            error(exc)
            return EXIT_REFUSED
        return EXIT_OK
    return _train(args, recipe, registry)


def _launch_world_size() -> int:
    from .recipe import RecipeError

    value = os.environ.get("WORLD_SIZE", "1").strip()
    if not value.isdigit() or not 1 <= int(value) <= 1_000_000:
        raise RecipeError(f"WORLD_SIZE={value[:40]!r} in the environment is not a positive number of processes")
    return int(value)


def plugin_exit_message(exc: SystemExit, registry) -> str:
    """A plugin's ``sys.exit`` (our code never calls it inside a command): its failure, by name."""
    who = registry.plugin_in_traceback(exc.__traceback__)
    who = f"plugin {who}" if who else "plugin code"
    return (f"{who} called sys.exit({exc.code!r}) while {lifecycle.phase_of(exc)}; a plugin must raise an "
            "exception instead of ending the process")


def elastic_store_warning(environ=os.environ) -> Optional[str]:
    """torchrun with --max_restarts and its shared rendezvous store (the default since torch 2.5)
    can stall a restarted group on the first round's stale keys (pytorch/pytorch#135712)."""
    if (environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0):
        return ("torchrun --max_restarts with the shared rendezvous store: a restarted group can stall on "
                "the first round's stale keys (pytorch/pytorch#135712); launch torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    return None


def _parent_command(pid: Optional[int] = None) -> list[str]:
    """The command line of the process that started this one (Linux /proc; [] elsewhere)."""
    try:
        raw = open(f"/proc/{pid or os.getppid()}/cmdline", "rb").read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _requested_processes(parent: Sequence[str]) -> Optional[int]:
    """Processes asked of ``accelerate launch`` in ``parent`` (its --num_processes, else its config
    file's num_processes); None when the parent is not an Accelerate launch."""
    try:
        at = next(i for i, a in enumerate(parent) if a == "launch" and i and parent[i - 1].endswith("accelerate"))
    except StopIteration:
        return None
    args, config = parent[at + 1:], None
    for i, a in enumerate(args):
        key, eq, value = a.partition("=")
        if key in ("--num_processes", "--num-processes") and (eq or i + 1 < len(args)):
            try:
                return int(value if eq else args[i + 1])
            except ValueError:
                return None
        if key in ("--config_file", "--config-file") and (eq or i + 1 < len(args)):
            config = value if eq else args[i + 1]
    try:
        import yaml

        if config is None:
            from accelerate.commands.config import default_config_file as config
        with open(config) as f:
            return int((yaml.safe_load(f) or {}).get("num_processes") or 1)
    except Exception:  # noqa: BLE001 - no readable config: nothing was asked beyond the default
        return None


def launch_warning(environ=os.environ, parent: Optional[Sequence[str]] = None, argv: Sequence[str] = (),
                   gpus: Optional[int] = None) -> Optional[str]:
    """A launch that asked for N processes and got fewer, with the command that works.

    ``accelerate launch --num_processes 2`` without ``--multi_gpu`` on a machine without GPUs
    starts one ordinary process (no WORLD_SIZE); a launcher that set WORLD_SIZE while this
    process sees another world size is caught the same way."""
    obtained = int(environ.get("WORLD_SIZE", "1") or 1)
    requested = _requested_processes(_parent_command() if parent is None else parent)
    if requested is None or requested <= obtained:
        return None
    import shlex

    rest = " ".join(shlex.quote(a) for a in argv) or "RECIPE [overrides]"
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    cpu = "ACCELERATE_USE_CPU=true " if gpus < requested else ""
    return (f"asked for {requested} processes but this launch runs {obtained}: `accelerate launch` starts "
            f"several processes only with --multi_gpu{' (and, without a GPU per process, ACCELERATE_USE_CPU=true)' if cpu else ''}. "
            f"Run: {cpu}accelerate launch --multi_gpu --num_processes {requested} -m radio_core.run {rest}  "
            f"(or: torchrun --nproc_per_node {requested} -m radio_core.run {rest})")


def group_warning(num_processes: int, environ=os.environ) -> Optional[str]:
    """The launcher started WORLD_SIZE processes but the training group holds fewer (each
    process then trains alone on the whole data)."""
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if num_processes >= world:
        return None
    return (f"the launcher started {world} processes (WORLD_SIZE) but this one trains in a group of "
            f"{num_processes}: every process would train alone. Launch with torchrun --nproc_per_node {world} "
            f"-m radio_core.run ... or ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {world} "
            f"-m radio_core.run ...")


def _train(args: argparse.Namespace, recipe, registry) -> int:
    from .registry import PluginError
    from .train.loop import BadDataError, NonFiniteLossError, NotTrainedError, Trainer

    warning = elastic_store_warning()
    if warning and os.environ.get("RANK", "0") == "0":
        print(f"warning: {warning}", file=sys.stderr, flush=True)

    try:
        with lifecycle.phase("building the teachers, the student and the data"):
            trainer = Trainer(recipe, registry=registry, resume=args.resume, recipe_path=args.recipe,
                              overwrite=args.overwrite)
    except (PluginError, ValueError, OSError) as exc:  # ResumeError, RunExistsError, CacheMismatchError, ...
        error(exc)
        _drop_process_group()
        return EXIT_REFUSED
    except SystemExit as exc:
        error(plugin_exit_message(exc, registry))
        _drop_process_group()
        return EXIT_REFUSED
    mismatch = group_warning(trainer.accelerator.num_processes)
    if mismatch and os.environ.get("RANK", "0") == "0":
        print(f"warning: {mismatch}", file=sys.stderr, flush=True)
    clean = False
    try:
        metrics = trainer.fit()
        clean = True
    except (PluginError, NonFiniteLossError, NotTrainedError, BadDataError, ValueError, OSError) as exc:
        error(exc)
        return EXIT_FAILED
    except SystemExit as exc:
        error(plugin_exit_message(exc, registry))
        return EXIT_FAILED
    finally:
        trainer.close(clean)
    if trainer.stopped:
        return EXIT_STOPPED
    if trainer.accelerator.is_main_process:
        s = trainer.state
        summary = "".join(f"; {k}={v:.4f}" for k, v in (metrics or {}).items() if k.startswith("loss/"))
        print(f"done: step {s.step}, trained: {s.learned_steps} step(s) learned, {s.skipped_steps} skipped as "
              f"non-finite{summary}; outputs in {os.path.abspath(recipe.output_dir)}")
    return EXIT_OK


def _drop_process_group() -> None:
    """A refused run may have joined a process group already: drop it (see ``Trainer.close``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
