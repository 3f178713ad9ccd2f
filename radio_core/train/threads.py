"""How many torch CPU threads each training process uses.

torch defaults to one thread per physical core in every process: with several local processes,
or other work on the machine, the threads outnumber the cores and spin against each other (on a
loaded 2-core machine 20 quickstart steps took 56 s with the default and 3 s with one thread).
The choice here: the cores this process may run on (affinity), shared among the local
processes, less the cores other work keeps busy (1-minute load average beyond our own
processes), at least 1. ``train.cpu_threads`` in the recipe, else ``OMP_NUM_THREADS`` in the
environment, overrides it.
"""
from __future__ import annotations

import os
from typing import Optional


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_threads(cores: int, local_processes: int, load: float) -> int:
    """Threads per process for ``local_processes`` processes on ``cores`` cores whose 1-minute
    load average is ``load`` (our own processes included, one each at most)."""
    local = max(1, local_processes)
    busy_elsewhere = max(0, int(load - local))  # whole cores only: a fraction is noise
    free = max(1, cores - busy_elsewhere)
    return max(1, min(cores // local, free // local))


def choose_threads(requested: Optional[int], local_processes: int) -> tuple[int, str]:
    """(threads, why) for this process; ``requested``: the recipe's ``train.cpu_threads``."""
    if requested:
        return int(requested), "train.cpu_threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = available_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    n = auto_threads(cores, local_processes, load)
    return n, f"{cores} cores, {local_processes} local process(es), load {load:.1f}; train.cpu_threads overrides"


def local_process_count(default: int) -> int:
    """Processes on this machine: torchrun / accelerate set LOCAL_WORLD_SIZE."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else max(1, default)
