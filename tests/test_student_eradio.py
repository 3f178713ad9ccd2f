"""The official E-RADIO as a student (plugin ``eradio``), against facts the official code produced
(tests/fixtures/official): parameter names and shapes of the published model, outputs of two small
configurations on seeded weights at 224, 512 and 256x384 px, and what the official loader computes
from the official-layout file this project writes."""
import pytest
import torch

from official_fixtures import (ERADIO_SIZES, ERADIO_STORED_CHANNELS, ERADIO_TINY, eradio_images,
                               eradio_release_images, fixture_json, fixture_tensors, seeded_, write_eradio_release)
from radio_core.model import RadioModel
from radio_core.registry import PluginError


def _tiny(registry, name, **kw):
    # the official backbone takes normalised images: an identity input conditioner here
    return seeded_(registry.build("student", "eradio", **ERADIO_TINY[name], mean=(0, 0, 0), std=(1, 1, 1), **kw), 0)


@pytest.mark.parametrize("name", sorted(ERADIO_TINY))
@pytest.mark.parametrize("backend, tolerance", [("math", 1e-6), ("sdpa", 1e-5)])
def test_outputs_match_the_official_code_at_224_512_and_non_square(registry, name, backend, tolerance):
    """``math`` runs the official order of operations (measured: 0.0); SDPA differs by rounding."""
    expected = fixture_tensors("eradio_tiny_outputs.safetensors")
    student = _tiny(registry, name, attention=backend).eval()
    runs = [(size, None) for size in ERADIO_SIZES] + ([((224, 224), 7)] if name == "conv" else [])
    for size, window in runs:
        if window:
            student.set_window_size(window)  # the official change_window_size
        with torch.no_grad():
            out = student(eradio_images(size))
        key = f"{name}.{size[0]}x{size[1]}" + (f".ws{window}" if window else "")
        features = out.patches.transpose(1, 2).reshape(1, -1, *out.grid)[:, :ERADIO_STORED_CHANNELS]
        assert features.shape == expected[f"{key}.features"].shape, key
        assert float((features - expected[f"{key}.features"]).abs().max()) <= tolerance, key
        assert float((out.summary[:, 0] - expected[f"{key}.summary"]).abs().max()) <= tolerance, key
    assert student.patch_size == (16 if name == "conv" else 8)


def test_the_published_model_has_the_official_parameters_and_buffers(registry):
    facts = fixture_json("eradio_state.json")
    with torch.device("meta"):
        student = registry.build("student", "eradio", model="eradio_large_fullres_ws16", num_cls_tokens=3)
    state = {k: list(v.shape) for k, v in student.state_dict().items() if k not in ("norm_mean", "norm_std")}
    assert state == facts["state"]
    assert sum(p.numel() for p in student.parameters()) == facts["parameters"] == 389_598_784
    assert student.embed_dim == 1536 and student.patch_size == 16
    assert student.official_model() == ("eradio_large_fullres_ws16", {"return_full_features": True})


def test_an_official_layout_file_loads_as_the_official_loader_builds_it(tmp_path):
    """The file this project writes for the eradio_xxxtiny_8x_ws12 preset: the official loader read it
    (fixture); our loader reads it to the same outputs, and writes it back unchanged."""
    expected = fixture_tensors("eradio_release_outputs.safetensors")
    path = tmp_path / "eradio.pth.tar"
    write_eradio_release(path)
    model = RadioModel.load(path)
    assert model.config["student"]["name"] == "eradio" and model.summary_idxs == [0]
    with torch.no_grad():
        out = model.adaptor_outputs(eradio_release_images())
    got = {"backbone.summary": out["backbone"].summary,
           "backbone.features": out["backbone"].spatial.flatten(2).transpose(1, 2)[..., :ERADIO_STORED_CHANNELS]}
    for name in ("clip", "dino"):
        got[f"{name}.summary"] = out[name].summary
        got[f"{name}.features"] = out[name].spatial.flatten(2).transpose(1, 2)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-5, worst
    again = tmp_path / "again.pth.tar"
    model.save_radio(again)
    a, b = torch.load(path, weights_only=False), torch.load(again, weights_only=False)
    assert (a["args"].model, a["args"].model_kwargs) == (b["args"].model, b["args"].model_kwargs)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_trains_and_its_contract(registry):
    student = _tiny(registry, "conv", num_cls_tokens=3).train()
    out = student(torch.rand(2, 3, 64, 96))
    assert out.grid == (4, 6) and out.patches.shape == (2, 24, 48) and out.summary.shape == (2, 3, 48)
    assert torch.equal(out.summary[:, 0], out.summary[:, 2])  # one summary: the mean feature
    (out.patches.pow(2).mean() + out.summary.mean()).backward()
    frozen = [n for n, p in student.named_parameters() if p.grad is None]
    assert not frozen, frozen
    assert student.size_multiple == 32 and student.optimal_window_size(224) == 7
    assert student.optimal_window_size(512) == 16
    with pytest.raises(ValueError, match="multiple of 32"):
        student(torch.rand(1, 3, 48, 64))
    with pytest.raises(PluginError, match="unknown model 'eradio_xl'"):
        registry.build("student", "eradio", model="eradio_xl")
    with pytest.raises(ValueError, match="only at its presets .* differs from eradio_large_fullres_ws16 in dim=16"):
        student.official_model()


@pytest.mark.parametrize("preset", ["eradio_xxxtiny", "eradio_xxxtiny_8x_ws12", "eradio_xxxtiny_8x_ws16"])
def test_every_preset_names_itself_and_a_window_override_is_not_a_preset(registry, preset):
    with torch.device("meta"):
        student = registry.build("student", "eradio", model=preset)
        assert student.official_model() == (preset, {"return_full_features": True})
        opened = registry.build("student", "eradio", model=preset, cpb_mlp_hidden=128)
        if preset == "eradio_xxxtiny":  # a field this preset leaves open travels in model_kwargs
            assert opened.official_model()[1]["cpb_mlp_hidden"] == 128
        with pytest.raises(ValueError, match="window_size"):
            registry.build("student", "eradio", model=preset, window_size=8).official_model()
