"""Ablation sweeps: sweep-file validation, run naming and cache keys, and end-to-end sweeps of
tiny runs that are killed midway and relaunched, or that contain failing runs."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from radio_core.sweep import SweepError, load_sweep, plan

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from helpers import fake_distribution  # noqa: E402
from test_data_scale import install_plugins  # noqa: E402  (tiny student + example timm teacher)

SAFE_NAME = re.compile(r"^[A-Za-z0-9._,+-]+$")  # no '=': names are folder names on command lines


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_recipe(teacher_checkpoint: str = "vit.safetensors", **extra) -> dict:
    recipe = {
        "student": {"name": "tiny_test_student", "args": {"embed_dim": 32, "patch_size": 8}, "resolution": 32},
        "teachers": {"vit": {"plugin": "timm_vit", "args": {
            "model": "vit_tiny_patch16_224", "img_size": 32, "depth": 1, "checkpoint": teacher_checkpoint}}},
        "data": {"source": {"name": "skimage_samples",
                            "args": {"names": ["camera", "grass", "gravel", "brick", "moon", "coffee"]}},
                 "batch_size": 2},
        "train": {"steps": 3, "log_every": 1},
        "checkpoint": {"every": 1, "export": False},
        "logging": {"tensorboard": False, "progress": False},
    }
    recipe.update(extra)
    return recipe


# ---------------------------------------------------------------------------------------
# sweep file and planning (no training)


@pytest.mark.parametrize("sweep, expected", [
    ({"recipe": "base.yaml", "output_dir": "o", "grids": {}}, "grids: unknown key (did you mean 'grid'?)"),
    ({"recipe": "base.yaml", "output_dir": "o", "cache": {"views": 0}}, "cache.views: Input should be greater"),
    ({"recipe": "base.yaml", "output_dir": "o", "overrides": ["train.steps"]},
     "overrides.0: override 'train.steps' is not of the form"),
    ({"recipe": "base.yaml", "output_dir": "o", "grid": {"optim.lr": []}}, "grid: grid axis 'optim.lr'"),
    ({"recipe": "base.yaml", "output_dir": "o", "runs": [{"name": "a"}, {"name": "a"}]}, "names ['a'] are given"),
    ({"recipe": "base.yaml", "output_dir": "o", "eval": {"knn": {}}}, "eval.knn.data: Field required"),
    ({"recipe": "base.yaml", "output_dir": "o", "eval": {"knn": {"data": "d", "topk": 3}}},
     "eval.knn.topk: unknown key"),
    ({"recipe": "base.yaml", "output_dir": "o", "overrides": ["output_dir=x"]}, "output_dir is set by the sweep"),
    ({"recipe": "missing.yaml", "output_dir": "o"}, "recipe: base recipe 'missing.yaml' not found"),
])
def test_sweep_file_errors_name_the_file_and_field(tmp_path, sweep, expected):
    write(tmp_path / "base.yaml", tiny_recipe())
    path = write(tmp_path / "sweep.yaml", sweep)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_plan_names_overrides_and_shared_cache_keys(tmp_path):
    recipe = tiny_recipe()
    recipe["teachers"]["other"] = dict(recipe["teachers"]["vit"])
    write(tmp_path / "base.yaml", recipe)
    path = write(tmp_path / "sweep.yaml", {
        "recipe": "base.yaml", "output_dir": str(tmp_path / "out"), "overrides": ["train.steps=2"],
        "grid": {"teachers.*.summary_loss.name": ["cosine", "smooth_l1"], "train.seed": [0, 1]},
        "runs": [{"overrides": []}, {"name": "wide head", "overrides": ["adaptor.args={num_inner: 1}"]},
                 {"name": "bad", "overrides": ["train.steps=0"]}],
        "cache": {"views": 2}})
    runs = plan(load_sweep(path), path)
    assert len(runs) == 3 * 4
    names = [r.name for r in runs]
    assert names == [r.name for r in plan(load_sweep(path), path)]  # stable
    assert len(set(names)) == len(names) and all(SAFE_NAME.match(n) for n in names)
    assert names[0] == "summary_loss.name-cosine,train.seed-0"
    assert names[4] == "wide_head,summary_loss.name-cosine,train.seed-0"
    first = runs[0]
    assert first.run_dir == tmp_path / "out" / "runs" / first.name
    # '*' expands to every teacher; the sweep-wide override comes first
    assert first.resolved_overrides == ["train.steps=2", "teachers.vit.summary_loss.name=cosine",
                                        "teachers.other.summary_loss.name=cosine", "train.seed=0"]
    assert {t.summary_loss.name for t in runs[1].recipe.teachers.values()} == {"cosine"}
    assert runs[2].recipe.teachers["other"].summary_loss.name == "smooth_l1"
    # Losses and heads don't change teacher targets: such runs share a cache; the seed does.
    good = [r for r in runs if r.error is None]
    by_seed = {seed: {r.cache_key for r in good if r.recipe.train.seed == seed} for seed in (0, 1)}
    assert all(len(keys) == 1 for keys in by_seed.values()) and by_seed[0] != by_seed[1]
    assert first.recipe.cache.path == str(tmp_path / "out" / "cache" / first.cache_key)
    assert first.recipe.augment.views == 2
    # an invalid combination is a failed run, not a failed sweep; the error names the field
    bad = [r for r in runs if r.name.startswith("bad")]
    assert len(bad) == 4 and all(r.recipe is None and "train.steps" in r.error for r in bad)

    write(path, {"recipe": "base.yaml", "output_dir": "o", "overrides": ["data.nothing.*=1"]})
    with pytest.raises(SweepError, match=r"'\*' matches no key \(at data.nothing\)"):
        plan(load_sweep(path), path)


def test_radio_cli_has_a_sweep_command(tmp_path, capsys):
    from radio_core.cli import main

    assert main(["--help"]) == 0 and "sweep SWEEP.yaml" in capsys.readouterr().out
    assert main(["sweep", str(tmp_path / "none.yaml")]) == 2
    assert "sweep file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# end to end: tiny runs in subprocesses


KILL_HOOK = '''
import os, signal
from radio_core import hookimpl


@hookimpl
def radio_step_end(trainer, step, metrics):
    # SWEEP_TEST_KILL=RUN_NAME:STEP:SIGNAL kills the whole sweep (its process group) mid-run.
    spec = os.environ.get("SWEEP_TEST_KILL")
    if spec:
        name, at, sig = spec.rsplit(":", 2)
        if trainer.out_dir.name == name and step == int(at):
            os.killpg(os.getpgrp(), getattr(signal, sig))
'''


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    paths = install_plugins(root)
    hook = fake_distribution(root / "hook", "sweep-test-hook", "sweep_test_hook", KILL_HOOK)
    # Teacher weights on disk (as real teachers have): the cache identity includes a weights
    # fingerprint, which a random init at every build would change.
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1)
    save_file(model.state_dict(), str(root / "vit.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(paths + [str(hook), os.environ.get("PYTHONPATH", "")])}
    env.pop("SWEEP_TEST_KILL", None)
    return env, str(root / "vit.safetensors")


def run_sweep(sweep: Path, env: dict, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**env, **({"SWEEP_TEST_KILL": kill} if kill else {})}
    # Its own session: the kill hook signals the sweep's process group, never pytest.
    return subprocess.run([sys.executable, "-m", "radio_core.sweep", str(sweep), "--no-progress", *args], env=env,
                          capture_output=True, text=True, timeout=480, start_new_session=True)


def events(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "launches.jsonl").read_text().splitlines()]


def table(out: Path) -> dict[str, dict]:
    with open(out / "results.csv") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_2x2_sweep_killed_midway_and_relaunched_runs_each_run_once(tmp_path, sweep_env):
    env, vit = sweep_env
    write(tmp_path / "base.yaml", tiny_recipe(vit))
    out = tmp_path / "out"
    sweep = write(tmp_path / "sweep.yaml", {
        "recipe": "base.yaml", "output_dir": str(out), "overrides": ["train.steps=3"],
        "grid": {"optim.lr": [1.0e-3, 2.0e-3], "adaptor.name": ["mlp", "linear"]},
        "cache": {"views": 2}, "eval": {"fidelity": {"images": 2}}})
    names = ["optim.lr-0.001,adaptor.name-mlp", "optim.lr-0.001,adaptor.name-linear",
             "optim.lr-0.002,adaptor.name-mlp", "optim.lr-0.002,adaptor.name-linear"]

    # Launch 1: the second run sends SIGTERM to the whole sweep at its step 2 (the first run has
    # finished). The run checkpoints step 2; the sweep waits for it, writes a partial table and
    # exits 128+15.
    first = run_sweep(sweep, env, kill=f"{names[1]}:2:SIGTERM")
    assert first.returncode == 128 + signal.SIGTERM, first.stdout + first.stderr
    assert [(out / "runs" / n / "SWEEP_DONE.json").is_file() for n in names] == [True, False, False, False]
    assert table(out)[names[1]]["status"] == "interrupted"
    assert table(out)[names[2]]["status"] == "pending"
    assert (out / "runs" / names[1] / "checkpoints" / "step_00000002").is_dir()

    # Launch 2: the third run SIGKILLs the whole sweep at its step 2: nothing can clean up.
    second = run_sweep(sweep, env, kill=f"{names[2]}:2:SIGKILL")
    assert second.returncode == -signal.SIGKILL, second.stdout + second.stderr
    assert [(out / "runs" / n / "SWEEP_DONE.json").is_file() for n in names] == [True, True, False, False]

    # Launch 3 finishes the sweep.
    third = run_sweep(sweep, env)
    assert third.returncode == 0, third.stdout + third.stderr
    rows = table(out)
    assert list(rows) == names and all(r["status"] == "ok" for r in rows.values())
    for row in rows.values():
        assert float(row["loss/total"]) > 0 and float(row["wall_s"]) > 0 and float(row["images_per_s"]) > 0
        assert -1 <= float(row["fidelity/32/vit/summary/cosine"]) <= 1
    md = (out / "results.md").read_text()
    assert all(n in md for n in names) and "fidelity/32/vit/summary/cosine" in md and md in third.stdout
    assert (out / "plots" / "loss_total.png").is_file()
    assert (out / "plots" / "fidelity_32_vit_summary_cosine.png").is_file()

    # Executions: every run trained to completion exactly once; finished runs were never started
    # again (skipped); interrupted ones continued from their checkpoint instead of restarting.
    ev = events(out)
    launches = {n: [e for e in ev if e["event"] == "launch" and e["run"] == n] for n in names}
    completions = {n: [e for e in ev if e["event"] == "exit" and e["run"] == n and e["status"] == "trained"]
                   for n in names}
    assert all(len(c) == 1 for c in completions.values()), completions
    assert [len(launches[n]) for n in names] == [1, 2, 2, 1]
    assert [l["resume"] for n in names for l in launches[n]] == [False, False, True, False, True, False]
    assert [e["run"] for e in ev if e["event"] == "skip"] == [names[0], names[0], names[1]]
    starts = sum(p.read_text().count("radio-distill:") for p in out.glob("runs/*/logs/attempt_*.stdout"))
    assert starts == 6
    assert "resumed from" in (out / "runs" / names[1] / "logs" / "attempt_2.stdout").read_text()
    assert re.search(r"resumed from .*step_0000000[12]",
                     (out / "runs" / names[2] / "logs" / "attempt_2.stdout").read_text())
    # SIGTERM loses nothing: every step of the interrupted run was trained (and logged) once.
    for n in (names[0], names[1], names[3]):
        steps = [json.loads(l)["step"] for l in (out / "runs" / n / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3], (n, steps)
    # Runs that agree on teachers and augmentation shared one cache, built once.
    assert len([e for e in ev if e["event"] == "cache_built"]) == 1
    assert len([p for p in (out / "cache").iterdir() if p.is_dir()]) == 1


@pytest.mark.slow
def test_failing_runs_are_recorded_and_the_others_finish(tmp_path, sweep_env):
    env, vit = sweep_env
    write(tmp_path / "base.yaml", tiny_recipe(vit))
    out = tmp_path / "out"
    sweep = write(tmp_path / "sweep.yaml", {
        "recipe": "base.yaml", "output_dir": str(out),
        "runs": [{"name": "crashes", "overrides": ["student.args.embed_dim=-3"]},  # passes validation, dies
                 {"name": "invalid", "overrides": ["train.steps=0"]},  # refused before launch
                 {"name": "good"}]})
    dry = run_sweep(sweep, env, "--dry-run")  # lists states and commands, launches nothing
    assert dry.returncode == 1 and "good: new" in dry.stdout and "invalid: invalid" in dry.stdout, dry.stdout
    assert "train.steps" in dry.stdout and "3 run(s), 2 invalid" in dry.stdout and not out.exists()

    res = run_sweep(sweep, env)
    assert res.returncode == 1, res.stdout + res.stderr
    rows = table(out)
    assert [rows[n]["status"] for n in ("crashes", "invalid", "good")] == ["failed", "failed", "ok"]
    # a student that cannot be built is refused before training (radio_core.run's exit status 2)
    assert "exit code 2" in rows["crashes"]["error"] and "negative dimension" in rows["crashes"]["error"]
    assert "train.steps" in rows["invalid"]["error"]
    assert float(rows["good"]["loss/total"]) > 0
    assert "negative dimension" in (out / "runs" / "crashes" / "stderr_tail.txt").read_text()
    assert "* crashes (failed): exit code 2" in (out / "results.md").read_text()
    assert [e["run"] for e in events(out) if e["event"] == "launch"] == ["crashes", "good"]


@pytest.mark.slow
def test_seeded_sweep_trains_every_arm_once_per_seed_and_compares_with_the_baseline(tmp_path, sweep_env):
    env, vit = sweep_env
    write(tmp_path / "base.yaml", tiny_recipe(vit))
    out = tmp_path / "out"
    sweep = write(tmp_path / "sweep.yaml", {
        "recipe": "base.yaml", "output_dir": str(out), "overrides": ["train.steps=2"],
        "grid": {"adaptor.name": ["mlp", "linear"]}, "seeds": [0, 1], "baseline": "adaptor.name=mlp",
        "eval": {"fidelity": {"images": 2}}})
    res = run_sweep(sweep, env)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = table(out)
    names = [f"adaptor.name-{a},seed-{s}" for a in ("mlp", "linear") for s in (0, 1)]
    assert list(rows) == names and all(r["status"] == "ok" for r in rows.values())
    for name in names:  # the seed reached the run
        recipe = yaml.safe_load((out / "runs" / name / "recipe.yaml").read_text())
        assert recipe["train"]["seed"] == int(name[-1])
    # different seeds: different initialisation and data order, so different losses
    assert rows[names[0]]["loss/total"] != rows[names[1]]["loss/total"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "adaptor.name-mlp"
    assert [(a["arm"], a["n"]) for a in summary["arms"]] == [("adaptor.name-mlp", 2), ("adaptor.name-linear", 2)]
    metric = "fidelity/32/vit/summary/cosine"
    comp = next(c for c in summary["comparisons"] if c["metric"] == metric)
    mlp, linear = ([float(rows[n][metric]) for n in names[i:i + 2]] for i in (0, 2))
    assert comp["paired"] and comp["mean"] == pytest.approx(((linear[0] - mlp[0]) + (linear[1] - mlp[1])) / 2)
    assert comp["verdict"] in ("resolved (higher)", "resolved (lower)", "inconclusive")
    # both arms optimise the same loss: loss values are compared too
    assert any(c["metric"] == "loss/total" for c in summary["comparisons"])
    md = (out / "results.md").read_text()
    assert "## Arms: mean ± 95% confidence interval" in md and "## Against the baseline arm adaptor.name-mlp" in md
    assert (out / "plots" / "loss_total.png").is_file()
