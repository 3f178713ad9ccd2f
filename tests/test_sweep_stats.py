"""Seeds and intervals in sweeps: Student-t intervals checked against scipy's own t-tests, and the
tables, verdicts and plots a seeded sweep writes from its runs' folders (no training here: each
run folder holds what a finished run leaves, written by the test)."""
import csv
import json
import sys
from pathlib import Path

import pytest
from scipy import stats as sps

from radio_core.sweep import Sweep, SweepError, difference, load_sweep, mean_ci, plan
from radio_core.sweep.state import DONE_MARKER, write_json

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import SAFE_NAME, tiny_recipe, write  # noqa: E402


def test_mean_interval_matches_scipy_one_sample_t():
    values = [0.81, 0.84, 0.80, 0.86]
    iv = mean_ci(values)
    ref = sps.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert iv.n == 4 and iv.low == pytest.approx(ref.low) and iv.high == pytest.approx(ref.high)
    assert mean_ci([1.0, 2.0, 3.0]).half == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6)  # t(0.975, 2) s/sqrt(n)
    assert mean_ci([0.5]).half is None and mean_ci([0.5]).text() == "0.5 (n=1)"


def test_differences_are_paired_by_seed_or_welch_and_match_scipy():
    base = {0: 0.70, 1: 0.74, 2: 0.69}
    better = {0: 0.75, 1: 0.80, 2: 0.73}
    d = difference(better, base)
    ref = sps.ttest_rel(list(better.values()), list(base.values())).confidence_interval(0.95)
    assert d.paired and d.interval.low == pytest.approx(ref.low) and d.interval.high == pytest.approx(ref.high)
    assert d.verdict == "resolved (higher)"
    # Unpaired (different seeds): Welch's interval, wider here; the same difference is inconclusive.
    shifted = {10: 0.75, 11: 0.80, 12: 0.73}
    w = difference(shifted, base)
    ref = sps.ttest_ind(list(shifted.values()), list(base.values()), equal_var=False).confidence_interval(0.95)
    assert not w.paired and w.interval.low == pytest.approx(ref.low) and w.interval.high == pytest.approx(ref.high)
    assert w.verdict == "inconclusive"
    assert difference({0: 0.1, 1: 0.5, 2: 0.2}, {0: 0.3, 1: 0.2, 2: 0.4}).verdict == "inconclusive"
    assert difference({0: 0.5}, {0: 0.4}).verdict == "inconclusive"  # one seed: no interval


LOSS_SWEEP = {"grid": {"teachers.*.summary_loss.name": ["cosine", "mse", "l1"]}, "seeds": [0, 1, 2],
              "baseline": "teachers.*.summary_loss.name=cosine"}


def test_seeds_expand_every_arm_and_set_train_seed(tmp_path):
    write(tmp_path / "base.yaml", tiny_recipe())
    path = write(tmp_path / "sweep.yaml", {"recipe": "base.yaml", "output_dir": str(tmp_path / "o"), **LOSS_SWEEP})
    runs = plan(load_sweep(path), path)
    assert [r.name for r in runs[:3]] == [f"summary_loss.name-cosine,seed-{s}" for s in (0, 1, 2)]
    assert all(SAFE_NAME.match(r.name) and "=" not in str(r.run_dir.relative_to(tmp_path)) for r in runs)
    assert [r.arm for r in runs] == [a for a in ("summary_loss.name-cosine", "summary_loss.name-mse",
                                                 "summary_loss.name-l1") for _ in range(3)]
    assert [r.recipe.train.seed for r in runs] == [0, 1, 2] * 3
    assert runs[4].resolved_overrides == ["teachers.vit.summary_loss.name=mse", "train.seed=1"]

    for bad, expected in [({"seeds": []}, "seeds: Value error, give at least one seed"),
                          ({"seeds": [1, 1]}, "seeds [1] are given more than once"),
                          ({"grid": {"train.seed": [0, 1]}}, "seeds: the sweep also sets train.seed"),
                          ({"overrides": ["train.seed=4"]}, "seeds: the sweep also sets train.seed")]:
        write(path, {"recipe": "base.yaml", "output_dir": "o", **LOSS_SWEEP, **bad})
        with pytest.raises(SweepError) as err:
            load_sweep(path)
        assert str(path) in str(err.value) and expected.replace("Value error, ", "") in str(err.value), str(err.value)
    write(path, {"recipe": "base.yaml", "output_dir": "o", **LOSS_SWEEP, "baseline": "cosine"})
    with pytest.raises(SweepError, match=r"baseline: 'cosine' names no arm; arms are: summary_loss.name-cosine, "):
        plan(load_sweep(path), path)


def finish(run, knn: float, loss: float) -> None:
    """What a finished run leaves in its folder: metrics.jsonl and the done marker with its evaluation."""
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss/total": loss, "images_per_s": 9.0}) + "\n")
    write_json(run.run_dir / DONE_MARKER, {"eval_spec": {}, "eval": {"knn/top1": knn}, "wall_s": 2.0})


def test_seeded_tables_give_intervals_and_verdicts_against_the_baseline(tmp_path):
    write(tmp_path / "base.yaml", tiny_recipe())
    out = tmp_path / "o"
    path = write(tmp_path / "sweep.yaml", {"recipe": "base.yaml", "output_dir": str(out), **LOSS_SWEEP})
    sweep = Sweep(load_sweep(path), path, progress=False)
    knn = {"cosine": [0.70, 0.74, 0.69], "mse": [0.75, 0.80, 0.73], "l1": [0.71, 0.70, 0.73]}
    for run in sweep.runs:
        loss = run.run_dir.name.split(",")[0].split("-")[1]
        if (loss, run.seed) != ("l1", 2):  # still running: left out of the statistics
            finish(run, knn[loss][run.seed], loss=0.1 * (run.seed + 1))
    sweep.write_results()

    with open(out / "comparisons.csv") as f:
        rows = {(r["arm"], r["metric"]): r for r in csv.DictReader(f)}
    mse = rows[("summary_loss.name-mse", "knn/top1")]
    assert mse["verdict"] == "resolved (higher)" and mse["paired"] == "True"
    assert float(mse["difference"]) == pytest.approx(0.05)
    l1 = rows[("summary_loss.name-l1", "knn/top1")]  # seeds 0 and 1 against three: Welch
    assert l1["verdict"] == "inconclusive" and l1["paired"] == "False"
    # The arms optimise different losses: their loss values are never compared or plotted.
    assert not any(m.startswith("loss/") for _, m in rows)
    md = (out / "results.md").read_text()
    assert "Training losses are not compared between arms" in md
    arms = json.loads((out / "summary.json").read_text())["arms"]
    assert [(a["arm"], a["n"]) for a in arms] == [("summary_loss.name-cosine", 3), ("summary_loss.name-mse", 3),
                                                   ("summary_loss.name-l1", 2)]
    ref = sps.ttest_1samp(knn["mse"], 0).confidence_interval(0.95)
    assert arms[1]["knn/top1"]["low"] == pytest.approx(ref.low) and arms[1]["knn/top1"]["high"] == pytest.approx(ref.high)
    assert f"| summary_loss.name-mse | 3 | {mean_ci(knn['mse']).text()} |" in md
    assert "| summary_loss.name-l1,seed-2 | pending | 2 |" in md
    assert (out / "plots" / "knn_top1.png").is_file() and not (out / "plots" / "loss_total.png").exists()
