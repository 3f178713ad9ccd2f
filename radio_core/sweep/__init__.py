"""Ablation sweeps: one base recipe, many training runs that differ by dotted overrides.

    python -m radio_core.sweep SWEEP.yaml [--only NAME] [--dry-run] [--status]
    radio sweep SWEEP.yaml [--only NAME] [--dry-run] [--status]

A sweep file (validated like a recipe: unknown keys are errors naming the file and field)::

    recipe: ../quickstart.yaml            # base recipe, relative to this sweep file
    output_dir: runs/ablation_loss        # relative to the current directory, like a recipe's
    overrides: [train.steps=200]          # applied to every run
    grid:                                 # cartesian product; '*' matches every key at its level
      teachers.*.summary_loss.name: [cosine, mse]
      optim.lr: [1.0e-3, 3.0e-4]
    runs:                                 # explicit runs; crossed with the grid when both are given
      - {name: no_sam, overrides: ["teachers.sam=null"]}
    seeds: [0, 1, 2]                      # every arm once per seed (train.seed); mean ± 95% CI
    baseline: summary_loss.name-cosine,optim.lr-0.001   # or one override: optim.lr=0.001
    cache: {views: 4}                     # one teacher-feature cache per group of runs that agree
    eval: {fidelity: true, knn: {data: DIR}, zeroshot: {data: DIR}}
    launcher: local                       # default; or {name: local, command: [accelerate, launch]},
                                          # {name: slurm, partition: gpu, gpus_per_node: 8, ...},
                                          # {name: ray, address: http://head:8265, num_gpus: 8, ...}

An *arm* is one grid point of one ``runs`` entry, named from its overrides (``key-value`` joined
by ','; no '=' in folder names); with ``seeds`` each arm has one run per seed, named
``<arm>,seed-<seed>``. Each run trains in its own process (``python -m radio_core.run BASE
overrides... output_dir=OUTPUT_DIR/runs/<name>``), so a crash is recorded and the sweep goes
on. Re-launching the same sweep skips finished runs (marker ``SWEEP_DONE.json``, written after
training and evaluation), resumes interrupted ones with ``--resume`` and retries failed ones.

With ``slurm`` or ``ray`` each run is a job that runs ``python -m radio_core.sweep SWEEP --execute
NAME`` (train, evaluate, mark done) on a node; its job id is recorded in the run's
``sweep_run.json``, so relaunching never submits a run whose job is queued or running.
``--status`` lists pending/running/done/failed per run and rebuilds the tables from the runs
that finished; pre-empted runs (exit status 75, ``radio_core.utils.EXIT_PREEMPTED``) requeue.

Output: ``runs/<name>/`` (the run's own output plus ``resolved_recipe.yaml``, ``sweep_run.json``,
``logs/``), ``cache/<key>/``, ``launches.jsonl`` (one line per launch, exit, skip and cache
build), ``results.md`` (runs; with seeds, mean ± 95% Student-t interval per arm; with a
baseline, every arm's difference from it and whether it is resolved), ``results.csv``,
``arms.csv``, ``comparisons.csv``, ``summary.json`` and ``plots/<metric>.png``.

Modules: ``spec`` (the file), ``grid`` (arms, seeds, names, cache keys), ``state`` (what a run's
folder says), ``local`` (training a run here), ``evaluate``, ``runner`` (the sweep loop),
``worker`` (one run in a job), ``remote`` (submitting, waiting, status), ``slurm_launcher``,
``ray_launcher``, ``stats``, ``tables``, ``results``, ``plots``, ``cli``.
"""
from .cli import dry_run, main
from .evaluate import evaluate
from .grid import (PlannedRun, baseline_arm, cache_identity, derive_name, expand_wildcards, identity_key,
                   override_string, plan, resolve_overrides, slug)
from .local import SweepInterrupted
from .runner import Sweep
from .spec import SweepError, SweepEval, SweepSpec, load_sweep
from .state import DONE_MARKER, LAUNCH_LOG, RUN_STATE, SNAPSHOT, completed_step, read_json, write_json
from .stats import difference, mean_ci

__all__ = ["DONE_MARKER", "LAUNCH_LOG", "PlannedRun", "RUN_STATE", "SNAPSHOT", "Sweep", "SweepError", "SweepEval",
           "SweepInterrupted", "SweepSpec", "baseline_arm", "cache_identity", "completed_step", "derive_name",
           "difference", "dry_run", "evaluate", "expand_wildcards", "identity_key", "load_sweep", "main",
           "mean_ci", "override_string", "plan", "read_json", "resolve_overrides", "slug", "write_json"]
