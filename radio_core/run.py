"""Train a student from a recipe.

    radio train RECIPE.yaml [key.path=value ...] [--resume]
    python -m radio_core.run RECIPE.yaml [overrides ...]          (the same)
    accelerate launch -m radio_core.run RECIPE.yaml [overrides ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .utils import EXIT_PREEMPTED


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "radio_core.run") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
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
    p.add_argument("--world-size", type=int, default=None, help=argparse.SUPPRESS if hidden else
                   "number of processes to plan for with --dry-run (default: this launch's)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GiB", help=argparse.SUPPRESS if hidden else
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


def main(argv: Optional[Sequence[str]] = None, prog: str = "radio_core.run") -> int:
    """Exit status as documented above; every failure is one ``error:`` line, no traceback
    (set RADIO_TRACEBACK=1 to see one for an internal error)."""
    args = parse_args(argv, prog)
    try:
        return _main(args)
    except KeyboardInterrupt:
        error("interrupted")
        return 130
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
        recipe = load_recipe(args.recipe, overrides)
        registry = get_registry()
        warn_plugin_problems(registry)
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        check_recipe(recipe, registry, world_size=world, origin=args.recipe)
        if args.validate:  # the recipe's own fields: a released model (student.init) is not read
            print(f"{args.recipe}: OK ({len(recipe.teachers)} teachers: {', '.join(recipe.teachers)})")
            return EXIT_OK
        if recipe.student.init is not None:  # the released architecture, checked as the recipe's
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


def elastic_store_warning(environ=os.environ) -> Optional[str]:
    """torchrun with --max_restarts and its shared rendezvous store (the default since torch 2.5)
    can stall a restarted group on the first round's stale keys (pytorch/pytorch#135712)."""
    if (environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0):
        return ("torchrun --max_restarts with the shared rendezvous store: a restarted group can stall on "
                "the first round's stale keys (pytorch/pytorch#135712); launch torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    return None


def _train(args: argparse.Namespace, recipe, registry) -> int:
    from .registry import PluginError
    from .train.loop import BadDataError, NonFiniteLossError, Trainer

    warning = elastic_store_warning()
    if warning and os.environ.get("RANK", "0") == "0":
        print(f"warning: {warning}", file=sys.stderr, flush=True)

    try:
        trainer = Trainer(recipe, registry=registry, resume=args.resume, recipe_path=args.recipe,
                          overwrite=args.overwrite)
    except (PluginError, ValueError, OSError) as exc:  # ResumeError, RunExistsError, CacheMismatchError, ...
        error(exc)
        _drop_process_group()
        return EXIT_REFUSED
    clean = False
    try:
        metrics = trainer.fit()
        clean = True
    except (PluginError, NonFiniteLossError, BadDataError, ValueError, OSError) as exc:
        error(exc)
        return EXIT_FAILED
    finally:
        trainer.close(clean)
    if trainer.stopped:
        return EXIT_STOPPED
    if trainer.accelerator.is_main_process and metrics:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss/"))
        print(f"done: step {trainer.state.step}; {summary}; outputs in {os.path.abspath(recipe.output_dir)}")
    return EXIT_OK


def _drop_process_group() -> None:
    """A refused run may have joined a process group already: drop it (see ``Trainer.close``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
