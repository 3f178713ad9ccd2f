"""A student's outputs are checked as teachers' are: a wrong type, a shape that does not match
its grid, or non-finite values end the run with a PluginError naming the student (exit status 3
from the command line), not an internal error or "non-finite losses". (Plugins that call
``sys.exit`` or hang: tests/test_every_phase.py.)"""
import subprocess
import sys

import pytest

from helpers import env_with, tiny_recipe
from test_every_phase import install_misbehaving, one_error

from radio_core.recipe import load_recipe
from radio_core.registry import PluginError, Registry
from radio_core.train.loop import Trainer

STUDENT = ["student={name: toy_student}", "student.resolution=64", "train.steps=2", "checkpoint.every=1000"]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """The installed plugins plus the misbehaving test distribution."""
    monkeypatch.syspath_prepend(str(install_misbehaving(tmp_path)))
    reg = Registry()
    reg.load_entry_points()
    assert not reg.failures
    return reg


@pytest.mark.parametrize("how,fragment", [
    ("type", "student 'toy_student': forward returned dict, not a StudentOutput"),
    ("shape", "student 'toy_student': patches output has shape (4, 15, 16); expected (4, 4*4 patches of the 4x4 "
              "grid, embed_dim=16)"),
    ("nan", "student 'toy_student': its outputs hold 1024 non-finite value(s) on the first batch"),
])
def test_a_student_breaking_its_contract_is_named(how, fragment, registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MISBEHAVE_STUDENT", how)
    trainer = Trainer(load_recipe(tiny_recipe(tmp_path, *STUDENT)), registry=registry)
    with pytest.raises(PluginError) as e:
        trainer.fit()
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run" / "export").exists()


def test_a_student_breaking_its_contract_exits_3_in_one_line(tmp_path):
    site = install_misbehaving(tmp_path)
    out = subprocess.run([sys.executable, "-m", "radio_core.cli", "train", str(tiny_recipe(tmp_path, *STUDENT))],
                         env=env_with(site, MISBEHAVE_STUDENT="shape"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-3000:]
    assert "student 'toy_student': patches output has shape" in one_error(out.stderr)


def test_a_student_that_turns_non_finite_later_is_named_in_the_skip_message(registry, tmp_path, monkeypatch,
                                                                              capsys):
    """After the first batch, NaN outputs are found without a host sync: the step's non-finite
    loss is reported as the student's."""
    from radio_core.train.loop import NonFiniteLossError

    trainer = Trainer(load_recipe(tiny_recipe(tmp_path, *STUDENT, "train.steps=8", "train.max_nonfinite_steps=2")),
                      registry=registry)

    class Turn:  # the student's weights go NaN after the first step
        @staticmethod
        def radio_step_end(trainer, step, metrics):
            if step == 1:
                for p in trainer.unwrapped.student.parameters():
                    p.data.fill_(float("nan"))

    from radio_core.hookspecs import hookimpl

    Turn.radio_step_end = hookimpl(Turn.radio_step_end)
    registry.plugin_manager.register(Turn, name="turn")
    with pytest.raises(NonFiniteLossError):
        trainer.fit()
    assert "non-finite loss from the student 'toy_student', whose outputs were non-finite" in capsys.readouterr().out
