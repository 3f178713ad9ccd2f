"""Train a student from a recipe.

    python -m radio_core.run RECIPE.yaml [key.path=value ...] [--resume]
    accelerate launch -m radio_core.run RECIPE.yaml [overrides ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="radio_core.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 teachers.dino.weight=0.5")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--output-dir", help="shorthand for the override output_dir=...")
    p.add_argument("--validate", action="store_true", help="check the recipe and plugin names, then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="build every model on the meta device and print FLOPs and memory per group and rank")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of processes to plan for with --dry-run (default: this launch's)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from .plan.checks import check_recipe
    from .recipe import RecipeError, load_recipe
    from .registry import PluginError, get_registry

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        recipe = load_recipe(args.recipe, overrides)
        registry = get_registry()
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        check_recipe(recipe, registry, world_size=world, origin=args.recipe)
    except (RecipeError, PluginError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.validate:
        print(f"{args.recipe}: OK ({len(recipe.teachers)} teachers: {', '.join(recipe.teachers)})")
        return 0
    if args.dry_run:
        from .plan.planner import dry_run

        try:
            print(dry_run(recipe, registry, world))
        except (RecipeError, PluginError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    from .train.loop import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(recipe, registry=registry, resume=args.resume, recipe_path=args.recipe)
    except (PluginError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        metrics = trainer.fit()
    except (PluginError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if trainer.accelerator.is_main_process and metrics:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss/"))
        print(f"done: step {trainer.state.step}; {summary}; outputs in {os.path.abspath(recipe.output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
