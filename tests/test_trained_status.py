"""A run that ends without learning does not end "done": every loss NaN in a run shorter than the
non-finite guard, or an objective that is exactly 0 (weights only a teacher without that target
gets), exits 3 naming why, with no export; a run that learned says how many steps did."""
import subprocess
import sys

from helpers import env_with, tiny_recipe
from test_every_phase import install_misbehaving, one_error

from radio_core.cli import main as radio


def _train(site, recipe):
    return subprocess.run([sys.executable, "-m", "radio_core.cli", "train", str(recipe)], env=env_with(site),
                          capture_output=True, text=True, timeout=300)


def test_a_short_run_whose_every_loss_is_nan_exits_3(tmp_path):
    site = install_misbehaving(tmp_path)
    nan = [f"teachers.{t}.{part}_loss={{name: toy_nan}}" for t in ("clip", "dino", "sam") for part in ("summary",
                                                                                                       "spatial")]
    out = _train(site, tiny_recipe(tmp_path, "train.steps=3", *nan))  # fewer than max_nonfinite_steps (5)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    line = one_error(out.stderr)
    assert "the run ended at step 3 without learning" in line and "3 skipped as non-finite" in line, line
    assert "done:" not in out.stdout and not (tmp_path / "run" / "export").exists()


def test_an_objective_that_is_exactly_zero_exits_3(tmp_path, capsys):
    """Weight only on SAM's summary, which SAM does not have: validation cannot know, the run can."""
    recipe = tiny_recipe(tmp_path, "train.steps=3", "teachers.clip.weight=0", "teachers.dino.weight=0",
                         "teachers.sam.spatial_weight=0")
    assert radio(["validate", str(recipe)]) == 0, capsys.readouterr().err
    assert radio(["train", str(recipe)]) == 3
    err = capsys.readouterr().err
    assert "without learning" in one_error(err) and "0 skipped as non-finite, the others 0" in err


def test_a_run_that_learned_says_so(tmp_path, capsys):
    assert radio(["train", str(tiny_recipe(tmp_path, "train.steps=2"))]) == 0, capsys.readouterr().err
    assert "done: step 2, trained: 2 step(s) learned, 0 skipped as non-finite; loss/total=" in capsys.readouterr().out
