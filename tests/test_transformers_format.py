"""transformers interoperability: exports load with AutoModel (no remote code) and compute the same
backbone; transformers RADIO checkpoints initialise a student; what can't be expressed is refused."""
import json

import pytest
import torch

from radio_core.cli import main as radio
from radio_core.models.distiller import Distiller, HeadSpec
from radio_core.formats.hf_transformers import TransformersFormatError
from radio_core.model import RadioModel
from radio_core.registry import PluginError

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "RadioModel"):
    pytest.skip("this transformers has no RadioModel", allow_module_level=True)

#: non-square, and one taller than wide, both multiples of the patch (16)
RESOLUTIONS = [(64, 96), (112, 48)]
ARCH = dict(model="vit_tiny", embed_dim=64, depth=2, num_heads=2, cpe_max_size=256, final_norm=False)


def tiny_model(registry, **student_args) -> RadioModel:
    torch.manual_seed(0)
    args = {**ARCH, "num_registers": 3, **student_args}
    student = registry.build("student", "vit", **args, num_cls_tokens=2)
    heads = [HeadSpec("clip", 32, 48), HeadSpec("sam", None, 24)]
    summary = {"clip": registry.build("adaptor", "mlp", in_dim=64, out_dim=32, hidden_dim=80)}
    spatial = {h.name: registry.build("adaptor", "mlp", in_dim=64, out_dim=h.spatial_dim, hidden_dim=80)
               for h in heads}
    distiller = Distiller(student, heads, summary, spatial)
    with torch.no_grad():  # random, non-trivial positions and tokens
        student.patch_generator.pos_embed.normal_()
        student.patch_generator.cls_token.token.normal_()
    config = {"format": "radio-distill-export", "version": 1,
              "student": {"name": "vit", "args": args, "num_cls_tokens": 2},
              "teachers": {"clip": {"summary_dim": 32, "spatial_dim": 48, "plugin": "clip", "use_summary": True},
                           "sam": {"summary_dim": None, "spatial_dim": 24, "plugin": "sam", "use_summary": False}},
              "adaptor": {"name": "mlp", "args": {}}, "hidden_dim": 80,
              "summary_slots": {"clip": 0}, "resolution": [64, 64]}
    return RadioModel(distiller, config).eval()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_export_loads_with_automodel_and_computes_the_same_backbone(registry, tmp_path):
    model = tiny_model(registry, init_values=0.3, spectral_reparam=True)  # layer scale + σReparam
    model.save(tmp_path / "export")
    reloaded = RadioModel.load(tmp_path / "export")  # σReparam baked, as any user sees it
    out = tmp_path / "hf"
    assert radio(["export", str(tmp_path / "export"), "--format", "transformers", "--out", str(out)]) == 0
    assert (out / "README.md").is_file() and "AutoModel.from_pretrained" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["model_type"] == "radio"

    hf = transformers.AutoModel.from_pretrained(out)  # trust_remote_code is off: transformers' own class
    assert type(hf) is transformers.RadioModel
    hf.eval()
    back = RadioModel.load(out)
    for h, w in RESOLUTIONS:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            summary, spatial = reloaded(x)
            ref = hf(pixel_values=x)
            ours = reloaded.adaptor_outputs(x)
            theirs = back.adaptor_outputs(x)
        assert ref.features.shape == (2, (h // 16) * (w // 16), 64)
        assert max_diff(summary, ref.summary) <= 1e-5
        assert max_diff(spatial.flatten(2).transpose(1, 2), ref.features) <= 1e-5
        for name in ("backbone", "clip", "sam"):
            for a, b in zip(ours[name], theirs[name]):
                assert (a is None) == (b is None)
                if a is not None:
                    assert max_diff(a, b) <= 1e-5, name


def test_transformers_checkpoint_initialises_the_student(registry, tmp_path):
    config = transformers.RadioConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
                                      max_img_size=256, num_cls_tokens=3, num_registers=5, summary_idxs=[0, 2])
    torch.manual_seed(1)
    hf = transformers.RadioModel(config).eval()
    with torch.no_grad():  # C-RADIO's layer scale is identity; make it count to test the folding
        for name, p in hf.named_parameters():
            if "lambda1" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    hf.save_pretrained(tmp_path / "c-radio")
    for init_values in (None, 0.1):  # folded into the linear layers / copied into the layer scale
        student = registry.build("student", "vit", **ARCH, num_cls_tokens=3, num_registers=5,
                                 init_values=init_values, pretrained=str(tmp_path / "c-radio")).eval()
        for h, w in RESOLUTIONS:
            x = torch.rand(2, 3, h, w)
            with torch.no_grad():
                ref, ours = hf(pixel_values=x), student(x)
            assert max_diff(ours.summary[:, [0, 2]].flatten(1), ref.summary) <= 1e-5
            assert max_diff(ours.patches, ref.features) <= 1e-5

    # the registry names the plugin around the format's own message
    with pytest.raises(PluginError, match="hidden_size is 64 in the checkpoint but the student has embed_dim 96"):
        registry.build("student", "vit", **{**ARCH, "embed_dim": 96}, num_cls_tokens=1,
                       pretrained=str(tmp_path / "c-radio"))


@pytest.mark.parametrize("kind, match", [
    ("final_norm", "ends with a LayerNorm .* final_norm: false"),
    ("window", "windowed attention .*window_size=2"),
    ("eradio", "E-RADIO"),
])
def test_what_transformers_cannot_express_is_refused_in_one_line(registry, tmp_path, kind, match):
    if kind == "eradio":
        model = tiny_model(registry)
        model.distiller.student = registry.build("student", "eradio_lite", variant="tiny", num_cls_tokens=2)
    else:
        model = tiny_model(registry, final_norm=kind == "final_norm")
        if kind == "window":
            model.set_window_size(2)
    with pytest.raises(TransformersFormatError, match=match) as info:
        model.save_transformers(tmp_path / "hf")
    assert "\n" not in str(info.value)


def test_save_pretrained_from_pretrained_round_trip_with_a_model_card(registry, tmp_path):
    model = tiny_model(registry)
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: radio-distill") and "RadioModel.load" in card
    assert "| clip | clip |" in card and "| sam | sam |" in card
    back = RadioModel.from_pretrained(tmp_path / "m")
    x = torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        for a, b in zip(model(x), back(x)):
            assert max_diff(a, b) == 0


# ------------------------------------------------------------------ every RadioConfig field: honoured or refused
BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=16, max_img_size=128,
            num_cls_tokens=2, num_registers=2, summary_idxs=[0, 1])
STUDENT = dict(model="vit_tiny", embed_dim=32, depth=2, num_heads=2, cpe_max_size=128, final_norm=False,
               num_registers=2)
#: field -> (config values, student args that match them, tensors the file leaves out)
FIELD_CASES = {
    "hidden_size": ({"hidden_size": 48}, {"embed_dim": 48}, ()),
    "num_hidden_layers": ({"num_hidden_layers": 3}, {"depth": 3}, ()),
    "num_attention_heads": ({"num_attention_heads": 4}, {"num_heads": 4}, ()),
    "mlp_ratio": ({"mlp_ratio": 2.0}, {"mlp_ratio": 2.0}, ()),
    "qkv_bias": ({"qkv_bias": False}, {"qkv_bias": False}, ()),
    "patch_size": ({"patch_size": 14, "max_img_size": 112}, {"patch_size": 14, "cpe_max_size": 112}, ()),
    "max_img_size": ({"max_img_size": 160}, {"cpe_max_size": 160}, ()),
    "hidden_act": ({"hidden_act": "quick_gelu"}, {"hidden_act": "quick_gelu"}, ()),
    "layer_norm_eps": ({"layer_norm_eps": 1e-3}, {"layer_norm_eps": 1e-3}, ()),
    "num_cls_tokens": ({"num_cls_tokens": 3, "summary_idxs": [0, 2]}, {"num_cls": 3}, ()),
    "num_registers": ({"num_registers": 5}, {"num_registers": 5}, ()),
    "norm_mean": ({"norm_mean": [0.3, 0.5, 0.7]}, {}, ("input_conditioner.norm_mean",)),
    "norm_std": ({"norm_std": [0.2, 0.3, 0.4]}, {}, ("input_conditioner.norm_std",)),
    "layerscale_value": ({"layerscale_value": 0.5}, {}, ("lambda1",)),
    "summary_idxs": ({"summary_idxs": [1]}, {}, ()),
    "use_swiglu_ffn": ({"use_swiglu_ffn": True}, None, ()),
    "num_channels": ({"num_channels": 4}, None, ()),
    "attention_probs_dropout_prob": ({"attention_probs_dropout_prob": 0.3}, {}, ()),
    "drop_path_rate": ({"drop_path_rate": 0.3}, {}, ()),
    "hidden_dropout_prob": ({"hidden_dropout_prob": 0.3}, {}, ()),
    "image_size": ({"image_size": 96}, {}, ()),
    "video_temporal_patch_size": ({"video_temporal_patch_size": 2}, {}, ()),
    "patch_dim": ({"patch_dim": 7}, {}, ()),
    "video_patch_dim": ({"video_patch_dim": 7}, {}, ()),
    "initializer_range": ({"initializer_range": 0.5}, {}, ()),
}


def test_every_radio_config_field_is_classified_and_has_a_case():
    from radio_core.formats.hf_transformers import CONFIG_FIELDS

    fields = set(transformers.RadioConfig.__dataclass_fields__)
    fields -= set(transformers.PretrainedConfig.__dataclass_fields__)  # the base class's: output options, dtype
    assert fields == set(CONFIG_FIELDS) == set(FIELD_CASES)


def _radio_dir(tmp_path, config_values: dict, drop=()):
    from safetensors.torch import load_file, save_file

    config = transformers.RadioConfig(**{**BASE, **config_values})
    torch.manual_seed(2)
    hf = transformers.RadioModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lambda1" in name or "embeddings" in name:
                p.normal_(0.5 if "lambda1" in name else 0.0, 0.5)
    hf.save_pretrained(tmp_path / "radio")
    weights = tmp_path / "radio" / "model.safetensors"
    if drop:
        state = load_file(str(weights))
        save_file({k: v for k, v in state.items() if not any(d in k for d in drop)}, str(weights))
        hf = transformers.RadioModel.from_pretrained(tmp_path / "radio").eval()  # what transformers fills in
    return hf, tmp_path / "radio"


@pytest.mark.parametrize("field", sorted(FIELD_CASES))
def test_each_config_field_is_honoured_or_refused(registry, tmp_path, field):
    from radio_core.formats.hf_transformers import read_transformers_radio, summary_rows

    values, student_args, drop = FIELD_CASES[field]
    hf, folder = _radio_dir(tmp_path, values, drop)
    if student_args is None:
        with pytest.raises(PluginError, match=field) as info:
            registry.build("student", "vit", **STUDENT, num_cls_tokens=2, pretrained=str(folder))
        assert "\n" not in str(info.value)
        return
    student_args = dict(student_args)
    num_cls = student_args.pop("num_cls", 2)
    student = registry.build("student", "vit", **{**STUDENT, **student_args}, num_cls_tokens=num_cls,
                             pretrained=str(folder)).eval()
    rows = summary_rows(*read_transformers_radio(folder))
    patch = student.patch_size
    x = torch.rand(2, 3, 4 * patch, 6 * patch)
    with torch.no_grad():
        ref, ours = hf(pixel_values=x), student(x)
    # features reach |x| ~ 20 here: relative to that scale
    assert max_diff(ours.summary[:, rows].flatten(1), ref.summary) <= 1e-6 * (1 + ref.summary.abs().max())
    assert max_diff(ours.patches, ref.features) <= 1e-6 * (1 + ref.features.abs().max())
    if student_args and field not in ("num_registers",):  # a student that does not match is refused, naming it
        with pytest.raises(PluginError, match=field):
            registry.build("student", "vit", **STUDENT, num_cls_tokens=2, pretrained=str(folder))


@pytest.mark.parametrize("what, match", [
    ("missing", "no config.json"), ("dinov2", "a transformers 'dinov2' model, not a RadioModel"),
    ("export", "a radio-distill export, not a transformers RadioModel"), ("file", "not a directory"),
    ("badjson", "not valid JSON"),
])
def test_a_folder_that_is_not_a_radio_model_is_named_in_one_line(registry, tmp_path, what, match):
    folder = tmp_path / "x"
    folder.mkdir()
    if what == "dinov2":
        transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=64)).save_pretrained(folder)
    elif what == "export":
        tiny_model(registry).save(folder)
    elif what == "file":
        folder = tmp_path / "weights.bin"
        torch.save({}, folder)
    elif what == "badjson":
        (folder / "config.json").write_text("{not json")
    from radio_core.formats.hf_transformers import TransformersFormatError, read_transformers_radio

    with pytest.raises(TransformersFormatError, match=match) as info:
        read_transformers_radio(folder)
    assert "\n" not in str(info.value)


def test_an_odd_cpe_size_exports_and_loads_in_transformers(registry, tmp_path):
    model = tiny_model(registry, cpe_max_size=200)  # 13 positions per side: written as 208
    model.save_transformers(tmp_path / "hf")
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.max_img_size == 208
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        summary, spatial = model(x)
        assert max_diff(spatial.flatten(2).transpose(1, 2), hf(pixel_values=x).features) <= 1e-5
