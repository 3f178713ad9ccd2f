"""MESA (an EMA of the student as a second target) and DAMP (multiplicative weight noise), the
robustness regularisers of the C-RADIO reports: off by default, exact under resume (killed and
resumed equals uninterrupted: losses, weights and the EMA), and each doing what its paper says."""
import pytest
import torch
from helpers import metrics, tiny_recipe
from safetensors.torch import load_file
from test_train import train

from radio_core.recipe import load_recipe
from radio_core.recipe.schema import RecipeError
from radio_core.train.regularizers import EMA_FILE, Damp, Mesa

BOTH = ["train.steps=8", "checkpoint.every=4", "checkpoint.export=false",
        "train.mesa={weight: 0.5, decay: 0.9, start_step: 2}", "train.damp={std: 0.1}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesa_damp")
    trainer, _ = train(tiny_recipe(tmp, *BOTH))
    return tmp, trainer, metrics(tmp / "run")


def test_killed_and_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    full_dir, full, rows = uninterrupted
    path = tiny_recipe(tmp_path, *BOTH)
    train(path, stop_at=3)  # mid-way between checkpoints: a checkpoint is written at the stop
    resumed, _ = train(path, resume=True)
    again = metrics(tmp_path / "run")
    assert [r["step"] for r in again] == list(range(1, 9))
    for a, b in zip(rows, again):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5, abs=1e-6), a["step"]
        assert ("loss/mesa" in a) == ("loss/mesa" in b)
        if "loss/mesa" in a:
            assert b["loss/mesa"] == pytest.approx(a["loss/mesa"], rel=1e-5, abs=1e-7), a["step"]
    for (name, p), (_, q) in zip(full.unwrapped.named_parameters(), resumed.unwrapped.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), (_, q) in zip(full.mesa.ema.state_dict().items(), resumed.mesa.ema.state_dict().items()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    saved = load_file(str(full_dir / "run" / "checkpoints" / "step_00000008" / EMA_FILE))
    ema = full.mesa.ema.state_dict()
    assert set(saved) == set(ema) and all(torch.equal(saved[k], ema[k]) for k in ema)


def test_mesa_term_starts_at_its_step_and_the_ema_lags_the_student(uninterrupted):
    _, trainer, rows = uninterrupted
    assert [("loss/mesa" in r) for r in rows] == [False, False] + [True] * 6  # start_step 2
    assert all(0 < r["loss/mesa"] < 1 for r in rows[2:])
    ema = dict(trainer.mesa.ema.named_parameters())
    moved = [n for n, p in trainer.unwrapped.named_parameters() if not torch.equal(p, ema[n])]
    assert len(moved) > 10  # it lags: decay 0.9 over 8 steps


def test_off_by_default(tmp_path):
    trainer, _ = train(tiny_recipe(tmp_path, "train.steps=1", "checkpoint.export=false"))
    assert trainer.mesa is None and trainer.damp is None and trainer.objective.mesa is None
    assert "loss/mesa" not in metrics(tmp_path / "run")[0]
    assert not list((tmp_path / "run" / "checkpoints").glob(f"*/{EMA_FILE}"))
    # a checkpoint without an EMA cannot continue a MESA run: refused, naming the file
    from radio_core.train.checkpoint import ResumeError
    from radio_core.train.loop import Trainer

    with pytest.raises(ResumeError, match=EMA_FILE):
        Trainer(load_recipe(tiny_recipe(tmp_path, "train.steps=1", "checkpoint.export=false", "train.mesa={}")),
                resume=True)


def test_mesa_update_is_the_ema_of_the_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    mesa = Mesa(model, weight=0.8, decay=0.75, start_step=0)
    before = {k: v.clone() for k, v in mesa.ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
    mesa.update()
    w = model[0].weight
    torch.testing.assert_close(mesa.ema[0].weight, 0.75 * before["0.weight"] + 0.25 * w)
    assert torch.equal(mesa.ema[1].running_mean, model[1].running_mean)  # buffers are copied
    assert not mesa.ema.training and not any(p.requires_grad for p in mesa.ema.parameters())


def test_damp_noise_has_its_std_is_seeded_and_the_clean_weights_come_back():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    clean = [p.detach().clone() for p in student.parameters()]
    damp = Damp(student, std=0.15, seed=3)
    assert len(damp.weights) == 2  # the Linear weights, not the biases

    def perturbed(step, slot, micro):
        with damp.perturbed(step, slot, micro):
            return [w.detach().clone() for w in damp.weights]

    a = perturbed(5, 0, 0)
    ratio = torch.cat([(p / c - 1).flatten() for p, c in zip(a, [clean[0], clean[2]])])
    assert float(ratio.std()) == pytest.approx(0.15, rel=0.05) and abs(float(ratio.mean())) < 0.01
    assert all(torch.equal(x, y) for x, y in zip(a, perturbed(5, 0, 0)))  # a function of (seed, step, ...)
    assert not torch.equal(a[0], perturbed(5, 0, 1)[0]) and not torch.equal(a[0], perturbed(6, 0, 0)[0])
    assert not torch.equal(a[0], perturbed(5, 8, 0)[0])  # another slot, another draw
    assert all(torch.equal(p, c) for p, c in zip(student.parameters(), clean))


def test_damp_gradient_is_taken_at_the_perturbed_weights():
    torch.manual_seed(1)
    student = torch.nn.Linear(6, 2)
    x = torch.randn(5, 6)
    damp = Damp(student, std=0.2, seed=0)
    with damp.perturbed(0, 0, 0):
        noisy = student.weight.detach().clone()
        student(x).square().sum().backward()
    w = noisy.clone().requires_grad_(True)
    torch.nn.functional.linear(x, w, student.bias.detach()).square().sum().backward()
    torch.testing.assert_close(student.weight.grad, w.grad)  # DAMP's reference: grad at w * (1 + std z)
    assert not torch.equal(student.weight.detach(), noisy)


def test_recipe_keys_are_validated(tmp_path):
    for bad, fragment in [("train.damp={std: 0}", "train.damp.std"), ("train.damp={std: 2.0}", "train.damp.std"),
                          ("train.mesa={decay: 1.0}", "train.mesa.decay"), ("train.mesa={wieght: 1}", "wieght"),
                          ("train.mesa={start_step: -1}", "train.mesa.start_step")]:
        with pytest.raises(RecipeError, match=fragment.replace(".", r"\.")):
            load_recipe(tiny_recipe(tmp_path, bad))
    with pytest.raises(RecipeError, match="fsdp"):
        load_recipe(tiny_recipe(tmp_path, "train.mesa={}", "train.fsdp.enabled=true"))
    recipe = load_recipe(tiny_recipe(tmp_path, "train.mesa={}", "train.damp={std: 0.1}"))
    assert (recipe.train.mesa.weight, recipe.train.mesa.decay, recipe.train.mesa.start_step) == (0.8, 0.9998, 0)
