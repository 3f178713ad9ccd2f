"""Exports against an official-style RADIO loader rebuilt from published facts (official_radio.py):
max |diff| 0 for plain models, models trained with PHI-S (folded heads) and _mlpnorm students."""
import math

import pytest
import torch

from radio_core.models.distiller import Distiller, HeadSpec
from radio_core.model import ExportError, RadioModel, save_export
from radio_core.formats.radio_checkpoint import RadioFormatError

from official_radio import OfficialRadio, max_abs_diff
from test_radio_format import D, official_checkpoint


def _distiller(registry, **student_kw):
    torch.manual_seed(0)
    kw = dict(model="vit_tiny", embed_dim=D, depth=2, num_heads=2, cpe_max_size=128, num_registers=2,
              spectral_reparam=True, num_cls_tokens=2)
    student = registry.build("student", "vit", **{**kw, **student_kw})
    mlp = lambda out, **k: registry.build("adaptor", "mlp", in_dim=D, out_dim=out, hidden_dim=24, **k)  # noqa: E731
    distiller = Distiller(student, [HeadSpec("clip", 24, 20), HeadSpec("dino", 16, 16), HeadSpec("sam", None, 12)],
                          {"clip": mlp(24, num_inner=1), "dino": mlp(16, activation="relu")},
                          {"clip": mlp(20), "dino": mlp(16), "sam": mlp(12, num_inner=2)})
    distiller.train()
    p = student.patch_size
    distiller(torch.rand(2, 3, 4 * p, 4 * p))  # move the σReparam estimates off their init
    return distiller.eval()


def _config():
    return {"student": {"name": "vit"}, "teachers": {"clip": {"plugin": "clip"}, "dino": {"plugin": "dinov2"},
                                                    "sam": {"plugin": "sam"}}}


def _crosscheck(model, path, images, in_memory_exact=True):
    """Write ``model`` in RADIO format; both loaders must compute the same from the file."""
    model.save_radio(path)
    official, ours = OfficialRadio(path).eval(), RadioModel.load(path)
    with torch.no_grad():
        expected = official(images)
        assert max_abs_diff(ours.adaptor_outputs(images), expected) == 0.0
        in_memory = max_abs_diff(model.adaptor_outputs(images), expected)
    if in_memory_exact:
        assert in_memory == 0.0
    return expected, in_memory


def test_official_file_and_its_round_trip_match_the_official_loader_exactly(tmp_path):
    path = tmp_path / "official.pth.tar"
    official_checkpoint(path)
    images = torch.rand(2, 3, 64, 96)
    model = RadioModel.load(path)
    with torch.no_grad():
        assert max_abs_diff(model.adaptor_outputs(images), OfficialRadio(path).eval()(images)) == 0.0
    _crosscheck(model, tmp_path / "again.pth.tar", images)


def test_mlpnorm_student_and_odd_cpe_size_export_exactly(tmp_path, registry):
    """An _mlpnorm student with cpe_max_size 200 (13 positions per side here; the official loader
    makes round(200 / 16) = 12 unless the file says 208)."""
    distiller = _distiller(registry, model="vit_tiny_mlpnorm", cpe_max_size=200)
    assert distiller.student.patch_generator.grid_side == 13
    with torch.no_grad():
        for block in distiller.student.blocks:
            block.mlp.norm.bias.uniform_(-1, 1)  # the MLP norm must matter to the outputs
    _crosscheck(RadioModel(distiller, _config()), tmp_path / "mlpnorm.pth.tar", torch.rand(2, 3, 64, 80))
    assert OfficialRadio(tmp_path / "mlpnorm.pth.tar").rows == 13


@pytest.fixture(scope="module")
def phi_s_run(tmp_path_factory):
    from radio_core.recipe import load_recipe
    from radio_core.train.loop import Trainer

    from helpers import tiny_recipe

    tmp = tmp_path_factory.mktemp("phis")
    path = tiny_recipe(tmp, "teachers.clip.target_norm=phi_s", "teachers.dino.target_norm=standardize",
                       "teachers.sam.target_norm=phi_s", "train.steps=3")
    trainer = Trainer(load_recipe(path))
    trainer.fit()
    return tmp / "run", trainer.unwrapped.eval()


def test_phi_s_trained_model_exports_heads_in_the_teachers_space(phi_s_run, tmp_path):
    run, distiller = phi_s_run
    assert {n for n in distiller.target_norms} == {"clip", "dino", "sam"}
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = distiller.student(images)
        truth = {n: distiller.denormalize_predictions(n, *distiller.predict(out, n)) for n in ("clip", "dino", "sam")}
    # the project's own export carries the normalisers: exact
    own = RadioModel.load(run / "export")
    with torch.no_grad():
        assert max_abs_diff(own.adaptor_outputs(images), truth) == 0.0
    # the official format folds them into each head's last layer: exact between the two loaders,
    # and the teacher's space up to float rounding of the fold
    expected, in_memory = _crosscheck(own, tmp_path / "phis.pth.tar", images, in_memory_exact=False)
    assert in_memory < 1e-3
    for name in ("clip", "dino"):
        cos = torch.cosine_similarity(expected[name][0], truth[name][0])
        assert cos.min() > 0.99999, name


def test_unestimated_target_norms_refuse_to_export(registry, tmp_path):
    from radio_core.models.target_norm import PHIS
    from radio_core.recipe import Recipe

    distiller = _distiller(registry)
    distiller.target_norms["clip"] = torch.nn.ModuleDict({"summary": PHIS(24)})
    with pytest.raises(RadioFormatError, match="teacher 'clip' summary head.*not estimated.*export refused"):
        RadioModel(distiller, _config()).save_radio(tmp_path / "x.pth.tar")
    recipe = Recipe.model_validate({"student": {"name": "vit", "args": {}, "resolution": 64},
                                    "teachers": {"clip": {"plugin": "clip"}}})
    with pytest.raises(ExportError, match=r"target_norms\['clip'\]\['summary'\]: statistics were never estimated"):
        save_export(distiller, recipe, None, tmp_path / "export")
    assert not (tmp_path / "x.pth.tar").exists()


def test_backbone_summary_and_mlp_versions_follow_the_official_rules(tmp_path):
    """Importing one adaptor keeps the backbone summary of every use_summary teacher; a teacher-level
    mlp_version applies to its summary head only (its feature head falls back to the file's)."""
    import torch.nn.functional as F

    path = tmp_path / "official.pth.tar"
    official_checkpoint(path)
    images = torch.rand(1, 3, 64, 64)
    only_dino = RadioModel.load(path, adaptor_names=["dino_v2"])
    assert only_dino.summary_idxs == [0, 1]
    with torch.no_grad():
        assert max_abs_diff(only_dino.adaptor_outputs(images),
                            OfficialRadio(path, ["dino_v2"]).eval()(images)) == 0.0

    chk = torch.load(path, weights_only=False)
    state, clip = chk["state_dict"], chk["args"].teachers[0]
    v2 = {k[len("_heads.0."):]: state.pop(k) for k in list(state) if k.startswith("_heads.0.")}
    hidden = v2["fc1.weight"].shape[0]
    state.update({"_heads.0.fc1.weight": v2["fc1.weight"], "_heads.0.fc1.bias": v2["fc1.bias"],
                  "_heads.0.norm.weight": v2["final.0.weight"], "_heads.0.norm.bias": v2["final.0.bias"],
                  "_heads.0.fc2.weight": F.normalize(torch.randn(7, hidden), dim=1),
                  "_heads.0.fc2.bias": torch.zeros(7)})
    clip["mlp_version"] = "v1"  # its feature head stays v2 (args.mlp_version)
    torch.save(chk, path)
    model = RadioModel.load(path)
    assert model.adaptors["clip"].summary_head.final[1].__class__.__name__ == "ReLU"
    assert model.adaptors["clip"].spatial_head.final[1].__class__.__name__ == "GELU"
    with torch.no_grad():
        assert max_abs_diff(model.adaptor_outputs(images), OfficialRadio(path).eval()(images)) == 0.0


# ------------------------------------------------------------------ names and CPE grids the exports write
def test_every_name_the_export_can_write_is_in_the_official_table():
    """The whole generable set (every size the vit student has, every patch size, with and without
    an MLP norm) against the official loader's name table, which the official code wrote."""
    from official_fixtures import fixture_json
    from radio_core.formats.radio_checkpoint import official_vit_name
    from radio_plugins.vit import VIT_SIZES

    official = set(fixture_json("model_names.json")["names"])
    written = {official_vit_name(size, patch, mlp_norm)
               for size in VIT_SIZES for patch in range(1, 65) for mlp_norm in (False, True)}
    assert written <= official, sorted(written - official)
    assert official_vit_name("large", 14, False) == "vit_large_patch14_224"  # the preset of that patch, if any


@pytest.mark.parametrize("model,patch", [("vit_tiny", 14), ("vit_small", 8), ("vit_base_mlpnorm", 12),
                                         ("vit_large", 16)])
def test_exports_of_other_sizes_and_patches_build_in_the_official_loader(tmp_path, registry, model, patch):
    distiller = _distiller(registry, model=model, patch_size=patch, cpe_max_size=8 * patch)
    path = tmp_path / "x.pth.tar"
    _crosscheck(RadioModel(distiller, _config()), path, torch.rand(1, 3, 4 * patch, 6 * patch))
    assert torch.load(path, weights_only=False)["args"].model_kwargs["patch_size"] == patch


def test_every_cpe_size_exports_with_its_exact_grid_in_both_formats():
    """Whatever cpe_max_size gave the student's grid, both exports describe that grid exactly: the
    official loader's round(cpe_max_size / p) and transformers' max_img_size // p."""
    from radio_core.formats.hf_transformers import student_to_transformers
    from radio_core.formats.radio_checkpoint import _official_args
    from radio_core.registry import get_registry

    registry = get_registry()
    for patch in (14, 16):
        for cpe_max_size in range(2 * patch, 12 * patch + 1):
            student = registry.build("student", "vit", model="vit_tiny", embed_dim=8, depth=1, num_heads=1,
                                     patch_size=patch, cpe_max_size=cpe_max_size, final_norm=False)
            side = student.patch_generator.grid_side
            written = _official_args(student, _config(), [], {}).cpe_max_size
            assert math.ceil(round(written / patch) * patch / patch) == side, (patch, cpe_max_size)
            hf = student_to_transformers(student, [0])[0]
            assert hf["max_img_size"] // patch == side, (patch, cpe_max_size)


def test_an_activation_other_than_gelu_travels_in_model_kwargs_and_an_epsilon_is_refused(tmp_path, registry):
    distiller = _distiller(registry, hidden_act="quick_gelu")
    path = tmp_path / "q.pth.tar"
    _crosscheck(RadioModel(distiller, _config()), path, torch.rand(1, 3, 48, 64))
    assert torch.load(path, weights_only=False)["args"].model_kwargs["act_layer"] == "quick_gelu"
    assert RadioModel.load(path).student.arch["hidden_act"] == "quick_gelu"
    with pytest.raises(RadioFormatError, match="layer_norm_eps=0.001"):
        RadioModel(_distiller(registry, layer_norm_eps=1e-3), _config()).save_radio(tmp_path / "e.pth.tar")
    assert not (tmp_path / "e.pth.tar").exists()


def test_a_file_we_write_is_what_the_official_loader_builds(tmp_path):
    """The official loader's outputs (fixture, tests/fixtures/official) on a ViT file this project
    writes with registers, layer scale, the _mlpnorm name, quick_gelu and a 13-position grid: our
    loader and the model in memory agree with them."""
    from official_fixtures import fixture_tensors, vit_release_images, write_vit_release

    expected = fixture_tensors("vit_release_outputs.safetensors")
    path = tmp_path / "vit.pth.tar"
    write_vit_release(path)
    with torch.no_grad():
        out = RadioModel.load(path).adaptor_outputs(vit_release_images())
    worst = 0.0
    for name in ("backbone", "clip", "dino"):
        worst = max(worst, float((out[name].summary - expected[f"{name}.summary"]).abs().max()),
                    float((out[name].spatial.flatten(2).transpose(1, 2) - expected[f"{name}.features"]).abs().max()))
    assert worst <= 1e-5, worst
