"""CPU threads per process: torch's default (one per core) vs the trainer's choice
(radio_core.cpu_threads), on the quickstart at tiny sizes, run side by side (interleaved).

    python bench/cpu_threads.py               # 20 steps, 2 rounds
    python bench/cpu_threads.py --procs 2     # two local ranks (torchrun, gloo)

Each arm is a fresh ``radio train`` process; the printed time is its wall time. The gap grows
with contention: other work on the machine, or several local processes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import QUICKSTART, TINY  # noqa: E402


def run(threads: str, steps: int, procs: int, out: Path) -> float:
    overrides = TINY + [f"train.steps={steps}", f"output_dir={out}", "checkpoint.export=false"]
    if threads != "auto":
        overrides.append(f"train.cpu_threads={threads}")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["HF_HUB_OFFLINE"] = "1"
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m", "radio_core.run"]
    else:
        cmd = [sys.executable, "-m", "radio_core.run"]
    start = time.perf_counter()
    done = subprocess.run(cmd + [str(QUICKSTART), *overrides], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    line = next((ln for ln in done.stdout.splitlines() if "CPU thread" in ln), "")
    print(f"  {threads:>5}: {elapsed:6.1f} s   {line.split(', ', 1)[-1]}", flush=True)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--procs", type=int, default=1)
    args = p.parse_args()
    import torch

    default = str(torch.get_num_threads())  # what torch would use in each process
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs; torch default {default} thread(s)")
    times: dict[str, list[float]] = {default: [], "auto": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in times:
                times[arm].append(run(arm, args.steps, args.procs, Path(tmp) / f"{arm}-{r}"))
    best = {k: min(v) for k, v in times.items()}
    print(f"best of {args.rounds}: torch default {best[default]:.1f} s, chosen {best['auto']:.1f} s, "
          f"ratio {best[default] / best['auto']:.2f}x")


if __name__ == "__main__":
    main()
