"""``python -m radio_core.sweep`` / ``radio sweep``: run, list (``--dry-run``) a sweep."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from ..recipe import RecipeError
from .grid import PlannedRun
from .runner import Sweep
from .spec import LocalLauncher, SweepError, load_sweep
from .state import completed_step
from ..utils import OneLineParser


def dry_run(sweep: Sweep, selected: list[PlannedRun]) -> int:
    from ..registry import PluginError, get_registry
    from ..plan.checks import check_recipe

    registry = get_registry()
    bad = 0
    for run in selected:
        state = sweep.state_of(run)
        if run.recipe is not None:
            try:
                check_recipe(run.recipe, registry, origin=f"{sweep.sweep_path} (run {run.name})")
            except (RecipeError, PluginError) as exc:
                run.error, state = str(exc), "invalid"
            except Exception as exc:  # noqa: BLE001 - a plugin's own error: report it, go on listing
                run.error, state = f"{type(exc).__name__}: {exc}", "invalid"
        print(f"{run.name}: {state}")
        if run.error:
            bad += 1
            print("  " + run.error.replace("\n", "\n  "))
            continue
        if run.cache_key:
            print(f"  cache {run.cache_key}")
        print("  " + shlex.join(sweep.command(run, completed_step(run.run_dir) > 0)))
    keys = {r.cache_key for r in selected if r.cache_key}
    print(f"{len(selected)} run(s), {bad} invalid, {len(keys)} teacher-feature cache(s); output in {sweep.out}")
    return 1 if bad else 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "radio_core.sweep") -> int:
    doc = sys.modules[__package__].__doc__  # the package's docstring is the manual (no import cycle)
    p = OneLineParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only runs whose name matches (glob; repeatable); the table lists all")
    p.add_argument("--dry-run", action="store_true", help="list runs, their state and commands; launch nothing")
    p.add_argument("--output-dir", help="override the sweep's output_dir")
    p.add_argument("--no-cache", action="store_true",
                   help="ignore the sweep's cache section: every run computes teacher targets online")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--status", action="store_true",
                   help="show pending/running/done/failed per run (asking the scheduler about recorded jobs) "
                        "and rebuild the tables from the runs that finished; launch nothing")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at once on this machine: N processes sharing the runs through per-run locks, one CPU "
                        "thread each (on a small CPU, N = cores beats one process using every core)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --jobs
    p.add_argument("--execute", metavar="NAME",
                   help="train, evaluate and mark one run in this process (what a slurm/ray job runs)")
    args = p.parse_args(argv)
    try:
        if args.execute:
            from .worker import RunHere

            return RunHere(args.sweep, args.output_dir, args.execute, args.no_cache)()
        spec = load_sweep(args.sweep)
        if args.no_cache:
            spec = spec.model_copy(update={"cache": None})
        sweep = Sweep(spec, args.sweep, args.output_dir, progress=not args.no_progress, no_cache=args.no_cache)
        if args.status:
            from .remote import print_status

            sweep.write_results(quiet=True)
            return print_status(sweep, sweep.select(args.only))
        if args.dry_run:
            return dry_run(sweep, sweep.select(args.only))
        if args.jobs < 1:
            raise SweepError(f"--jobs must be at least 1, got {args.jobs}")
        if isinstance(spec.launcher, LocalLauncher):
            return sweep.run(args.only, jobs=args.jobs, worker=args.worker)
        if args.jobs > 1:
            raise SweepError(f"--jobs applies to local sweeps; this one's launcher is {spec.launcher.name}")
        from .remote import run_remote

        return run_remote(sweep, sweep.select(args.only), args.no_cache)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
