"""End-to-end distillation on CPU with the built-in tiny teachers and the ViT-CPE student."""
import json

import pytest
import torch
from helpers import metrics, tiny_recipe

from radio_core.recipe import load_recipe
from radio_core.train.loop import Trainer


def train(path, *overrides, resume=False, stop_at=None):
    recipe = load_recipe(path, list(overrides))
    trainer = Trainer(recipe, resume=resume)
    if stop_at is not None:
        class Stop:  # the same path SIGTERM takes: finish the step, checkpoint, return
            @staticmethod
            def radio_step_end(trainer, step, metrics):
                if step == stop_at:
                    trainer.request_stop()
        from radio_core.hookspecs import hookimpl

        Stop.radio_step_end = hookimpl(Stop.radio_step_end)
        trainer.registry.plugin_manager.register(Stop, name=f"stop-{id(trainer)}")
        try:
            return trainer, trainer.fit()
        finally:
            trainer.registry.plugin_manager.unregister(name=f"stop-{id(trainer)}")
    return trainer, trainer.fit()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    path = tiny_recipe(tmp)
    trainer, last = train(path)
    return tmp, trainer, metrics(tmp / "run")


def test_twenty_steps_loss_falls_for_every_teacher(uninterrupted):
    tmp, trainer, rows = uninterrupted
    assert [r["step"] for r in rows] == list(range(1, 21))
    first, last = rows[0], rows[-1]
    assert last["loss/total"] < 0.6 * first["loss/total"], (first["loss/total"], last["loss/total"])
    for key in ("clip/summary", "clip/spatial", "dino/summary", "dino/spatial", "sam/spatial"):
        early = sum(r[f"loss/{key}"] for r in rows[:3]) / 3
        late = sum(r[f"loss/{key}"] for r in rows[-3:]) / 3
        assert late < early, key
    assert "loss/sam/summary" not in last  # SAM has no summary target
    assert last["images_per_s"] > 0 and last["lr"] >= 0


def test_outputs_appear(uninterrupted):
    tmp, trainer, rows = uninterrupted
    run = tmp / "run"
    assert (run / "recipe.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "checkpoints" / "step_00000020" / "model.safetensors").is_file()
    assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "config.json").is_file()


def test_resume_reproduces_the_uninterrupted_loss_curve(uninterrupted, tmp_path):
    _, _, full = uninterrupted
    path = tiny_recipe(tmp_path)
    train(path, stop_at=8)
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, 9))
    train(path, resume=True)
    resumed = metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == list(range(1, 21))
    for a, b in zip(full, resumed):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5, abs=1e-6), a["step"]


def test_export_reloads_through_the_registry(uninterrupted):
    """The exported safetensors rebuild the same student + heads from config.json alone."""
    from radio_core.eval.loading import load_run

    tmp, trainer, _ = uninterrupted
    run = load_run(tmp / "run", with_teachers=False)
    x = torch.rand(2, 3, 64, 64)
    trainer.unwrapped.eval()
    with torch.no_grad():
        a, pa = trainer.unwrapped(x, return_predictions=True)
        b, pb = run.distiller(x, return_predictions=True)
    torch.testing.assert_close(a.patches, b.patches)
    torch.testing.assert_close(pa["clip"][0], pb["clip"][0])


def test_export_has_a_model_card_and_converts_for_transformers(uninterrupted):
    """The run's export holds a card (teachers, steps, how to load); `radio export RUN` writes a
    directory transformers' AutoModel loads, with the trained backbone's outputs."""
    from radio_core.cli import main as radio
    from radio_core.model import RadioModel

    transformers = pytest.importorskip("transformers")
    tmp, trainer, _ = uninterrupted
    card = (tmp / "run" / "export" / "README.md").read_text()
    assert "20 optimiser steps" in card and "| dino | dinov2 |" in card and "RadioModel.load" in card
    assert "```yaml" in card  # the resolved recipe
    if not hasattr(transformers, "RadioModel"):
        pytest.skip("this transformers has no RadioModel")
    assert radio(["export", str(tmp / "run"), "--format", "transformers"]) == 0
    hf = transformers.AutoModel.from_pretrained(tmp / "run" / "export_transformers").eval()
    model = RadioModel.load(tmp / "run" / "export")
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        summary, spatial = model(x)
        out = hf(pixel_values=x)
    assert (summary - out.summary).abs().max() <= 1e-5
    assert (spatial.flatten(2).transpose(1, 2) - out.features).abs().max() <= 1e-5


def test_gradient_accumulation_draws_distinct_micro_batches(tmp_path):
    """2 micro-batches of 2 per step: the step sees the same 4 images as one batch of 4."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train(tiny_recipe(tmp_path / "a", "train.steps=2", "data.batch_size=4", "data.log_samples=true"))
    train(tiny_recipe(tmp_path / "b", "train.steps=2", "data.batch_size=2", "train.grad_accum=2",
                      "data.log_samples=true"))
    read = lambda d: [json.loads(l)["keys"] for l in (d / "run" / "samples_rank0.jsonl").read_text().splitlines()]
    assert read(tmp_path / "a") == read(tmp_path / "b")
    assert all(len(k) == 4 for k in read(tmp_path / "b"))
