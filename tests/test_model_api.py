"""User-facing model API: save_export -> RadioModel.load, adaptors, supported resolutions."""
import json

import pytest
import torch

from radio_core.formats.export import ExportError, load_export, save_export
from radio_core.formats.radio_model import RadioModel, nearest_supported_resolution
from radio_core.recipe import Recipe

DIMS = {"clip": (24, 20), "dino": (16, 16), "sam": (None, 12)}


def make_recipe(student=None, **teacher_overrides):
    student = student or {"name": "vit", "args": {"model": "vit_tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
                                                  "cpe_max_size": 256, "num_registers": 1}, "resolution": 64}
    teachers = {"clip": {"plugin": "clip"}, "dino": {"plugin": "dinov2"},
                "sam": {"plugin": "sam", "use_summary": False}}
    for name, extra in teacher_overrides.items():
        teachers[name].update(extra)
    return Recipe.model_validate({"student": student, "teachers": teachers})


def trained_distiller(recipe, registry):
    from radio_core.models.distiller import build_distiller

    torch.manual_seed(0)
    distiller = build_distiller(recipe, DIMS, registry)
    distiller.train()
    distiller(torch.rand(2, 3, 64, 64))  # BN statistics / σReparam estimates move like in training
    return distiller.eval()


def assert_same_predictions(distiller, model, images):
    with torch.no_grad():
        _, expected = distiller(images, return_predictions=True)
        got = model.adaptor_outputs(images)
    for name, (summary, spatial) in expected.items():
        for a, b in ((summary, got[name].summary), (spatial, got[name].spatial)):
            assert (a is None and b is None) or torch.equal(a, b), name


def test_save_export_then_load_gives_identical_outputs(tmp_path, registry):
    recipe = make_recipe(dino={"adaptor": {"name": "mlp", "args": {"num_inner": 1}}})
    distiller = trained_distiller(recipe, registry)
    save_export(distiller, recipe, None, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["student"] == {"name": "vit", "args": recipe.student.args, "num_cls_tokens": 2}
    assert config["teachers"]["sam"] == {"summary_dim": None, "spatial_dim": 12, "plugin": "sam", "use_summary": False}
    assert config["summary_slots"] == {"clip": 0, "dino": 1} and config["resolution"] == [64, 64]
    assert config["hidden_dim"] == 24

    model = RadioModel.load(tmp_path / "export")
    assert not model.training
    images = torch.rand(2, 3, 64, 96)
    assert_same_predictions(distiller, model, images)
    summary, spatial = model(images)
    assert summary.shape == (2, 2 * 32) and model.summary_dim == 64  # both CLS tokens, concatenated
    assert spatial.shape == (2, 32, 4, 6)
    features = model.forward_features(images)
    clip_summary, clip_spatial = model.adaptors["clip"](features)
    assert clip_summary.shape == (2, 24) and clip_spatial.shape == (2, 20, 4, 6)
    assert model.adaptors["sam"](features).summary is None
    assert sorted(model.adaptors) == ["clip", "dino", "sam"]
    with pytest.raises(KeyError, match="no adaptor for teacher 'siglip'"):
        model.adaptors["siglip"]
    # the weights file alone (or the config) also names the export
    again = RadioModel.load(tmp_path / "export" / "model.safetensors")
    assert_same_predictions(distiller, again, images)


def test_target_normalisation_travels_with_the_export(tmp_path, registry):
    recipe = make_recipe(clip={"target_norm": "phi_s"}, dino={"target_norm": "standardize"})
    distiller = trained_distiller(recipe, registry)
    for name, norms in distiller.target_norms.items():
        for kind, norm in norms.items():
            dim = DIMS[name][0 if kind == "summary" else 1]
            norm.update(torch.randn(64, dim) * 3 + 1)
            norm.finalize()
    save_export(distiller, recipe, None, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["target_norms"]["clip"]["spatial"] == {"class": "radio_core.normalize.PHIS",
                                                         "args": {"dim": 20, "eps": 1e-6}}
    model = RadioModel.load(tmp_path / "export")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        _, preds = distiller(images, return_predictions=True)
        got = model.adaptor_outputs(images)
    for name in ("clip", "dino"):  # adaptor outputs come back in the teacher's true space
        summary, spatial = distiller.denormalize_predictions(name, *preds[name])
        torch.testing.assert_close(got[name].summary, summary)
        torch.testing.assert_close(got[name].spatial, spatial)
        assert not torch.allclose(got[name].summary, preds[name][0])


def test_export_of_spectral_and_eradio_students(tmp_path, registry):
    from radio_core.models.spectral import has_spectral_reparam

    recipe = make_recipe({"name": "vit", "args": {"model": "vit_tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
                                                  "cpe_max_size": 256, "spectral_reparam": True}, "resolution": 64})
    distiller = trained_distiller(recipe, registry)
    save_export(distiller, recipe, None, tmp_path / "spectral")
    # the export keeps the parametrisation (a recipe-built distiller loads it, see eval.loading) ...
    rebuilt, _ = load_export(tmp_path / "spectral")
    assert has_spectral_reparam(rebuilt)
    # ... and RadioModel bakes it into plain weights
    model = RadioModel.load(tmp_path / "spectral")
    assert not has_spectral_reparam(model)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images).spatial, distiller.student(images).spatial())

    recipe = make_recipe({"name": "eradio_lite", "args": {"variant": "tiny", "summary": "project"}, "resolution": 64})
    distiller = trained_distiller(recipe, registry)
    save_export(distiller, recipe, None, tmp_path / "eradio_lite")
    assert_same_predictions(distiller, RadioModel.load(tmp_path / "eradio_lite"), torch.rand(2, 3, 64, 96))

    from official_fixtures import ERADIO_TINY

    recipe = make_recipe({"name": "eradio", "args": ERADIO_TINY["conv"], "resolution": 64})
    distiller = trained_distiller(recipe, registry)  # BatchNorm statistics moved by training
    save_export(distiller, recipe, None, tmp_path / "eradio")
    model = RadioModel.load(tmp_path / "eradio")
    assert model.summary_idxs == [0]  # one summary: the mean feature
    assert_same_predictions(distiller, model, torch.rand(2, 3, 64, 96))


def test_supported_resolutions():
    assert nearest_supported_resolution(500, 333) == (496, 336)
    assert nearest_supported_resolution(5, 700, multiple=32) == (32, 704)


def test_model_refuses_unsupported_sizes_and_bad_exports(tmp_path, registry):
    recipe = make_recipe()
    save_export(trained_distiller(recipe, registry), recipe, None, tmp_path / "export")
    model = RadioModel.load(tmp_path / "export")
    assert model.nearest_supported_resolution(500, 333) == (496, 336)
    with pytest.raises(ValueError, match="nearest: 496x336"):
        model(torch.rand(1, 3, 500, 333))
    model.set_window_size(2)
    assert model.nearest_supported_resolution(500, 333) == (512, 320)
    model.set_window_size(None)

    with pytest.raises(ExportError, match="missing config.json"):
        RadioModel.load(tmp_path)
    config_path = tmp_path / "export" / "config.json"
    config = json.loads(config_path.read_text())
    config["teachers"]["clip"]["spatial_dim"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="weights do not match the config"):
        RadioModel.load(tmp_path / "export")
    config["teachers"]["clip"]["spatial_dim"] = 20
    config["target_norms"] = {"clip": {"summary": {"class": "os.system", "args": {}}}}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="refusing class 'os.system'"):
        RadioModel.load(tmp_path / "export")
    config.pop("target_norms")
    config["student"]["name"] = "vitt"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="unknown student 'vitt'.*Did you mean 'vit'"):
        RadioModel.load(tmp_path / "export")
