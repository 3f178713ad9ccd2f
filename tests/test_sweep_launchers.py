"""Sweep launchers: options validated like recipe fields; the slurm launcher against submitit's
local executor (jobs are local processes), with a pre-empted arm requeued and arms finishing out
of order; the ray launcher against a Ray instance started here on loopback. Tables built from
the runs' folders must equal those of a plain local sweep."""
import csv
import json
import os
import sys
from pathlib import Path

import pytest

from radio_core.sweep import SweepError, load_sweep, plan

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import events, run_sweep, sweep_env, tiny_recipe, write  # noqa: E402,F401  (sweep_env: fixture)


@pytest.mark.parametrize("launcher, expected", [
    ({"name": "slurm", "partitoin": "gpu"}, "launcher.partitoin: unknown key (did you mean 'partition'?)"),
    ({"name": "ray", "num_gpus": -1}, "launcher.num_gpus: Input should be greater than or equal to 0"),
    ({"name": "pbs"}, "launcher: unknown launcher 'pbs' (valid: local, slurm, ray)"),
    ({"name": "slurm", "cluster": "lsf"}, "launcher.cluster: Input should be 'slurm' or 'local'"),
    ({"name": "local", "command": "python"}, "launcher.command: Input should be a valid list"),
])
def test_launcher_options_are_validated_like_recipe_fields(tmp_path, launcher, expected):
    write(tmp_path / "base.yaml", tiny_recipe())
    path = write(tmp_path / "sweep.yaml", {"recipe": "base.yaml", "output_dir": "o", "launcher": launcher})
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_launcher_shorthands_and_the_training_command(tmp_path):
    from radio_core.sweep.runner import Sweep

    write(tmp_path / "base.yaml", tiny_recipe(groups={"a": {"teachers": ["vit"], "ranks": 2},
                                                       "b": {"teachers": ["vit"], "ranks": 1}}))
    path = write(tmp_path / "sweep.yaml", {"recipe": "base.yaml", "output_dir": str(tmp_path / "o"),
                                           "launcher": ["accelerate", "launch"]})
    sweep = Sweep(load_sweep(path), path)
    assert sweep.spec.launcher.name == "local"
    assert sweep.command(sweep.runs[0], False)[:4] == ["accelerate", "launch", "-m", "radio_core.run"]
    write(path, {"recipe": "base.yaml", "output_dir": str(tmp_path / "o"), "launcher": "slurm"})
    sweep = Sweep(load_sweep(path), path)
    # a job starts as many processes as the recipe's groups ask for (2 + 1 ranks), on its node
    assert sweep.command(sweep.runs[0], True)[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node", "3", "-m"]


def test_slurm_job_script_carries_the_launcher_options(tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="the slurm launcher needs submitit: pip install 'radio-distill[slurm]'")
    from radio_core.sweep.runner import Sweep
    from radio_core.sweep.slurm_launcher import SlurmJobs

    # submitit builds a SLURM executor only where `srun` is on PATH; this script is written, never run.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    write(tmp_path / "base.yaml", tiny_recipe())
    path = write(tmp_path / "sweep.yaml", {"recipe": "base.yaml", "output_dir": str(tmp_path / "o"), "launcher": {
        "name": "slurm", "partition": "gpu", "time_min": 240, "gpus_per_node": 8, "mem_gb": 64,
        "setup": ["module load cuda"], "additional": {"exclusive": True}}})
    sweep = Sweep(load_sweep(path), path)
    script = SlurmJobs(sweep, sweep.spec.launcher)._executor(sweep.runs[0])._make_submission_file_text("CMD", "1")
    for line in ("--partition=gpu", "--time=240", "--gpus-per-node=8", "--mem=64GB", "--signal=USR2@120",
                 "--requeue", "--exclusive", "--job-name=radio-base", "--ntasks-per-node=1", "module load cuda"):
        assert line in script, (line, script)


SLOW_AND_PREEMPT_HOOK = '''
import os, signal, time
from radio_core import hookimpl


@hookimpl
def radio_step_end(trainer, step, metrics):
    # SWEEP_TEST_WAIT=RUN:FILE: that run waits at its first step until FILE exists (so it finishes last).
    # SWEEP_TEST_PREEMPT=RUN:STEP: that run gets SIGTERM at STEP, as from a scheduler's pre-emption.
    name = trainer.out_dir.name
    run, _, path = os.environ.get("SWEEP_TEST_WAIT", "").partition(":")
    if run == name and step == 1:
        deadline = time.monotonic() + 600
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.2)
    run, _, at = os.environ.get("SWEEP_TEST_PREEMPT", "").rpartition(":")
    if run == name and step == int(at) and not (trainer.out_dir / "preempted_once").exists():
        (trainer.out_dir / "preempted_once").touch()
        os.kill(os.getpid(), signal.SIGTERM)
'''


@pytest.fixture(scope="module")
def launcher_env(sweep_env, tmp_path_factory):
    from helpers import fake_distribution

    env, vit = sweep_env
    hook = fake_distribution(tmp_path_factory.mktemp("hook2"), "sweep-launcher-hook", "sweep_launcher_hook",
                             SLOW_AND_PREEMPT_HOOK)
    return {**env, "PYTHONPATH": str(hook) + ":" + env["PYTHONPATH"]}, vit


def csv_rows(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {r["name"]: r for r in csv.DictReader(f)}


TIMING = ("images_per_s", "wall_s")


def same_table(a: Path, b: Path) -> None:
    """Same runs, statuses and numbers (timings aside), same per-arm intervals."""
    ra, rb = csv_rows(a / "results.csv"), csv_rows(b / "results.csv")
    assert list(ra) == list(rb)
    for name in ra:
        assert {k: v for k, v in ra[name].items() if k not in TIMING} == \
            {k: v for k, v in rb[name].items() if k not in TIMING}, name
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    strip = lambda s: [{k: v for k, v in arm.items() if k not in TIMING} for arm in s["arms"]]  # noqa: E731
    assert strip(sa) == strip(sb)


def two_arm_sweep(tmp_path: Path, vit: str, out: Path, launcher) -> Path:
    base = tmp_path / "base.yaml"
    if not base.exists():
        write(base, tiny_recipe(vit))
    return write(tmp_path / f"sweep_{out.name}.yaml", {
        "recipe": "base.yaml", "output_dir": str(out), "overrides": ["train.steps=3"],
        "grid": {"adaptor.name": ["mlp", "linear"]}, "eval": {"fidelity": {"images": 2}}, "launcher": launcher})


@pytest.mark.slow
def test_slurm_launcher_on_submitit_local_executor_requeues_and_matches_a_local_sweep(tmp_path, launcher_env):
    pytest.importorskip("submitit", reason="the slurm launcher needs submitit: pip install 'radio-distill[slurm]'")
    env, vit = launcher_env
    names = ["adaptor.name-mlp", "adaptor.name-linear"]
    local = run_sweep(two_arm_sweep(tmp_path, vit, tmp_path / "local", "local"), env)
    assert local.returncode == 0, local.stdout + local.stderr

    out = tmp_path / "slurm"
    sweep = two_arm_sweep(tmp_path, vit, out, {"name": "slurm", "cluster": "local", "poll_s": 0.5, "time_min": 60})
    # The first arm waits for the second to be done, so they finish out of order; the second is
    # pre-empted at step 2.
    res = run_sweep(sweep, {**env, "SWEEP_TEST_WAIT": f"{names[0]}:{out / 'runs' / names[1] / 'SWEEP_DONE.json'}",
                            "SWEEP_TEST_PREEMPT": f"{names[1]}:2"})
    assert res.returncode == 0, res.stdout + res.stderr
    ev = events(out)
    assert [e["run"] for e in ev if e["event"] == "submit"] == names  # one job per arm, never twice
    assert [e["run"] for e in ev if e["event"] == "finished"] == names[::-1]  # out of order
    state = json.loads((out / "runs" / names[1] / "sweep_run.json").read_text())
    assert state["job"]["launcher"] == "slurm" and state["job"]["id"].isdigit() and len(state["jobs"]) == 1
    # pre-empted: SIGTERM -> checkpoint -> requeued by submitit -> resumed from the checkpoint, in the same job
    launches = [e for e in ev if e["event"] == "launch" and e["run"] == names[1]]
    assert [l["resume"] for l in launches] == [False, True]
    assert [a["status"] for a in state["attempts"]] == ["interrupted", "trained"]
    assert "resumed from" in (out / "runs" / names[1] / "logs" / "attempt_2.stdout").read_text()
    same_table(out, tmp_path / "local")

    # Relaunching submits nothing; --status reads the same folders.
    again = run_sweep(sweep, env)
    assert again.returncode == 0 and [e["event"] for e in events(out)[len(ev):]].count("submit") == 0
    status = run_sweep(sweep, env, "--status")
    assert status.returncode == 0 and "2 done, 0 running, 0 pending, 0 failed" in status.stdout, status.stdout
    assert all(f"done     {n}" in status.stdout for n in names)


def test_status_shows_pending_running_done_failed_per_run(tmp_path, capsys):
    """--status from the folders alone (a local sweep: no jobs to ask about)."""
    from radio_core.sweep.cli import main
    from radio_core.sweep.state import DONE_MARKER, write_json

    write(tmp_path / "base.yaml", tiny_recipe())
    out = tmp_path / "o"
    path = write(tmp_path / "sweep.yaml", {"recipe": "base.yaml", "output_dir": str(out),
                                           "runs": [{"name": "a"}, {"name": "b"}, {"name": "c"},
                                                    {"name": "bad", "overrides": ["train.steps=0"]}]})
    runs = {r.name: r for r in plan(load_sweep(path), path)}
    for name in ("a", "b"):
        runs[name].run_dir.mkdir(parents=True)
    write_json(runs["a"].run_dir / DONE_MARKER, {"eval_spec": {"fidelity": False, "knn": None, "zeroshot": None},
                                                 "eval": {}})
    write_json(runs["b"].run_dir / "sweep_run.json", {"status": "failed", "error": "exit code 1: boom"})
    assert main([str(path), "--status"]) == 0
    text = capsys.readouterr().out
    assert "done     a" in text and "failed   b  exit code 1: boom" in text and "pending  c  not started" in text
    assert "failed   bad  " in text and "1 done, 0 running, 1 pending, 2 failed" in text
    assert (out / "results.md").is_file()


@pytest.mark.slow
def test_ray_launcher_on_a_local_ray_instance(tmp_path, launcher_env, monkeypatch):
    try:
        import ray
        from ray.job_submission import JobSubmissionClient  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"ray is not installed here ({exc}); pip install 'radio-distill[ray]' to run this test")
    env, vit = launcher_env
    # A cluster of this process's own, on loopback only: no token to hand around.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {**env, "RAY_AUTH_MODE": "disabled"}
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=None, _node_ip_address="127.0.0.1", log_to_driver=False,
                   configure_logging=False)
    try:
        address = f"http://{ctx.dashboard_url}"
        names = ["adaptor.name-mlp", "adaptor.name-linear"]
        # the second arm is pre-empted at step 2: its job fails with exit status 75 and the
        # waiting sweep submits it again (Ray does not requeue by itself); it resumes.
        job_env = {**{k: env[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "OMP_NUM_THREADS")},
                   "SWEEP_TEST_PREEMPT": f"{names[1]}:2"}
        out = tmp_path / "ray"
        sweep = two_arm_sweep(tmp_path, vit, out, {"name": "ray", "address": address, "num_cpus": 1, "poll_s": 0.5,
                                                   "runtime_env": {"env_vars": job_env}})
        res = run_sweep(sweep, env)
        assert res.returncode == 0, res.stdout + res.stderr
        rows = csv_rows(out / "results.csv")
        assert [rows[n]["status"] for n in names] == ["ok", "ok"]
        client = JobSubmissionClient(address)
        states = [json.loads((out / "runs" / n / "sweep_run.json").read_text()) for n in names]
        assert [[j["id"].rsplit("-", 1)[1] for j in st["jobs"]] for st in states] == [["1"], ["1", "2"]]
        assert all(st["job"]["launcher"] == "ray" and st["job"]["id"].endswith(f"{n}-{len(st['jobs'])}")
                   for st, n in zip(states, names))
        assert [str(client.get_job_status(j["id"])).rsplit(".", 1)[-1] for j in states[1]["jobs"]] == ["FAILED",
                                                                                                     "SUCCEEDED"]
        assert [a["status"] for a in states[1]["attempts"]] == ["interrupted", "trained"]
        again = run_sweep(sweep, env)
        assert again.returncode == 0 and again.stdout.count("done already (skipped)") == 2
        assert [e["event"] for e in events(out)].count("submit") == 3
    finally:
        ray.shutdown()
