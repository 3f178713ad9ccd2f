"""A newcomer's first hour: long work shows progress with an estimate of what is left, a wait on
a lock says what it waits for and who holds it, and a launch that asked for two ranks and got
one says so at start with the command that works."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, env, env_with

from radio_core.locks import LockTimeout, describe_holder, file_lock, holder_path
from radio_core.progress import progress
from radio_core.run import group_warning, launch_warning


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_writes_whole_lines_with_rate_and_eta_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("RADIO_PROGRESS", raising=False)
    out = io.StringIO()
    bar = progress(10, "distill", "step", stream=out, every_s=None)
    for i in range(10):
        bar.update(1)
        if i in (0, 4):
            bar.line()  # what training does at its logging steps
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 3, lines  # two logging steps + the final line
    assert re.match(r"distill:\s+10% 1/10 \[\d\d:\d\d<.*step", lines[0]), lines[0]
    assert lines[1].startswith("distill:  50% 5/10") and lines[-1].startswith("distill: 100% 10/10")
    assert "<" in lines[1] and ("step/s" in lines[1] or "s/step" in lines[1])  # ETA and rate


def test_progress_lines_come_by_time_and_a_terminal_gets_the_live_bar(monkeypatch):
    monkeypatch.delenv("RADIO_PROGRESS", raising=False)
    out = io.StringIO()
    bar = progress(3, "features", "img", stream=out, every_s=0.0)  # a line on every update
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert len(out.getvalue().splitlines()) == 3
    tty = FakeTTY()
    bar = progress(3, "features", "img", stream=tty)
    bar.update(3)
    bar.close()
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()
    quiet = io.StringIO()
    bar = progress(3, "features", "img", stream=quiet, enabled=False)  # logging.progress: false
    bar.update(3)
    bar.line()
    bar.close()
    assert quiet.getvalue() == ""
    monkeypatch.setenv("RADIO_PROGRESS", "0")
    bar = progress(3, "x", stream=quiet)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""


HOLD = """
import sys, time
from radio_core.locks import file_lock
with file_lock(sys.argv[1], "the test resource"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_waiter_is_told_what_it_waits_for_and_who_holds_it(tmp_path):
    lock = tmp_path / "teacher.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "30"], stdout=subprocess.PIPE, text=True,
                              env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        told = []
        with pytest.raises(LockTimeout, match=f"pid {holder.pid}"):
            with file_lock(lock, "the proxy SAM teacher", timeout=0.6, poll_s=0.1, notify=told.append):
                pass
        assert len(told) == 1, told
        assert told[0].startswith("waiting for the proxy SAM teacher: held by pid ")
        assert f"pid {holder.pid} on " in told[0] and "command: " in told[0] and "the test resource" not in told[0]
        assert HOLD.strip().splitlines()[0] not in told[0]  # the command line, not the script
    finally:
        holder.kill()
        holder.wait()
    # the kernel released it with the process; the stale sidecar names a dead pid
    assert "has exited" in describe_holder(lock)
    told = []
    with file_lock(lock, "the proxy SAM teacher", timeout=5, notify=told.append):
        assert f'"pid": {os.getpid()}' in holder_path(lock).read_text()
    assert told == [] and not holder_path(lock).exists()


def test_waiting_ends_when_the_holder_lets_go(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "1.0"], stdout=subprocess.PIPE, text=True,
                              env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        told, start = [], time.monotonic()
        with file_lock(lock, "x", poll_s=0.05, notify=told.append):
            waited = time.monotonic() - start
        assert told[0].startswith("waiting for x: held by") and told[-1].startswith("got x after")
        assert 0.2 < waited < 20
    finally:
        holder.wait()


def test_launch_warning_names_the_command_that_works():
    parent = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "-m", "radio_core.run"]
    text = launch_warning({}, parent, ["r.yaml", "train.steps=3"], gpus=0)
    assert "asked for 2 processes but this launch runs 1" in text
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m radio_core.run r.yaml " \
           "train.steps=3" in text and "torchrun --nproc_per_node 2" in text
    assert launch_warning({"WORLD_SIZE": "2"}, parent, [], gpus=0) is None  # got what it asked for
    assert launch_warning({}, ["bash"], [], gpus=0) is None  # not under accelerate
    assert launch_warning({}, parent[:3] + ["--num_processes=4"], [], gpus=8).startswith("asked for 4")
    assert "ACCELERATE_USE_CPU" not in launch_warning({}, parent, [], gpus=2)
    # a launcher that set WORLD_SIZE=2 while the training group formed with one process
    assert group_warning(1, {"WORLD_SIZE": "2"}).startswith("the launcher started 2 processes")
    assert group_warning(2, {"WORLD_SIZE": "2"}) is None and group_warning(1, {}) is None


@pytest.mark.slow
def test_two_ranks_launched_the_wrong_way_get_the_warning(tmp_path):
    """``accelerate launch --num_processes 2`` without --multi_gpu on a machine without GPUs."""
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "-m", "radio_core.run",
                           str(REPO / "recipes" / "tiny_random.yaml"), "--validate"],
                          capture_output=True, text=True, env=env_with(CUDA_VISIBLE_DEVICES=""), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: asked for 2 processes")]
    assert len(warnings) == 1, proc.stderr[-2000:]
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m radio_core.run" in warnings[0]


def test_training_writes_one_progress_line_per_logging_step_into_a_log(tmp_path):
    """stderr is a pipe here, as in a SLURM log: whole lines with rate and ETA, no carriage returns."""
    from helpers import run_cli, tiny_recipe

    recipe = tiny_recipe(tmp_path, "train.steps=4", "train.log_every=2", "logging.progress=true",
                         "checkpoint.export=false")
    out = run_cli(str(recipe))
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("distill:")]
    assert [ln.split()[2] for ln in lines] == ["1/4", "2/4", "4/4"], out.stderr[-2000:]  # steps 1, 2 and 4 log
    assert all(re.search(r"\[\d\d:\d\d<\d\d:\d\d, .*(step/s|s/step), loss=", ln) for ln in lines), lines
    assert "\r" not in out.stderr


def test_a_second_sweep_in_the_same_folder_is_told_who_runs_the_first(tmp_path):
    from radio_core.sweep.runner import Sweep

    sweep = Sweep.__new__(Sweep)  # the lock needs only the output folder
    sweep.out = tmp_path / "sweep"
    second = [sys.executable, "-c", "import sys; from pathlib import Path; from radio_core.sweep.runner import Sweep; "
              "s = Sweep.__new__(Sweep); s.out = Path(sys.argv[1]); s.lock(); print('locked')", str(sweep.out)]
    held = sweep.lock()
    try:
        refused = subprocess.run(second, capture_output=True, text=True, env=env(), timeout=120)
    finally:
        held.close()
    assert refused.returncode != 0 and "locked" not in refused.stdout
    assert f"another sweep is running in {sweep.out} (held by pid {os.getpid()} on " in refused.stderr, \
        refused.stderr[-1000:]
    assert "command: " in refused.stderr
    after = subprocess.run(second, capture_output=True, text=True, env=env(), timeout=120)  # released
    assert after.returncode == 0 and "locked" in after.stdout, after.stderr[-1000:]
