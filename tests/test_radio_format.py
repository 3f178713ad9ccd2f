"""Official RADIO checkpoint format: import, export round trip, refusal of unsafe pickles."""
import argparse
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from radio_core.formats.export import FeatureNormalizer
from radio_core.formats.radio_checkpoint import RadioFormatError, load_radio_checkpoint, read_checkpoint
from radio_core.formats.radio_model import RadioModel

D, P, SIDE = 32, 16, 8  # embed dim, patch, CPE grid side (cpe_max_size 128)
MARKER = "RADIO_FORMAT_TEST_PWNED"


# ----------------------------------------------------------------------- an official-layout file
def _mlp_v2(rng, d_in, hidden, d_out, num_inner=0):
    sd = {"fc1.weight": torch.randn(hidden, d_in, generator=rng) * 0.2,
          "fc1.bias": torch.randn(hidden, generator=rng) * 0.1}
    for i in range(num_inner):
        sd[f"blocks.{i}.0.weight"] = 1 + 0.1 * torch.randn(hidden, generator=rng)
        sd[f"blocks.{i}.0.bias"] = 0.1 * torch.randn(hidden, generator=rng)
        sd[f"blocks.{i}.2.weight"] = torch.randn(hidden, hidden, generator=rng) * 0.2
        sd[f"blocks.{i}.2.bias"] = 0.1 * torch.randn(hidden, generator=rng)
    sd["final.0.weight"] = 1 + 0.1 * torch.randn(hidden, generator=rng)
    sd["final.0.bias"] = 0.1 * torch.randn(hidden, generator=rng)
    sd["final.2.weight"] = torch.randn(d_out, hidden, generator=rng) * 0.2
    sd["final.2.bias"] = 0.1 * torch.randn(d_out, generator=rng)
    return sd


def _mlp_v2_forward(sd, x, num_inner=0):
    x = F.linear(x, sd["fc1.weight"], sd["fc1.bias"])
    for i in range(num_inner):
        y = F.gelu(F.layer_norm(x, x.shape[-1:], sd[f"blocks.{i}.0.weight"], sd[f"blocks.{i}.0.bias"]))
        x = x + F.linear(y, sd[f"blocks.{i}.2.weight"], sd[f"blocks.{i}.2.bias"])
    x = F.gelu(F.layer_norm(x, x.shape[-1:], sd["final.0.weight"], sd["final.0.bias"]))
    return F.linear(x, sd["final.2.weight"], sd["final.2.bias"])


def _sn_parametrize(rng, weight, chunks, training_state=True):
    """Official σReparam keys whose realised weight is ``weight`` (per row-chunk), version 2. In a
    training state the official loader bakes the parametrisation in train mode, after one more
    power iteration (u = normalize(W v), then v = normalize(Wᵀ u)); in an EMA state it does not."""
    original = weight * 3.0
    keys = {"parametrizations.weight.original": original}
    parts = original.split(original.shape[0] // chunks)
    for i, part in enumerate(parts):
        u = F.normalize(torch.randn(part.shape[0], generator=rng), dim=0)
        v = F.normalize(torch.randn(part.shape[1], generator=rng), dim=0)
        iu, iv = u, v
        if training_state:
            iu = F.normalize(part @ v, dim=0, eps=1e-6)
            iv = F.normalize(part.T @ iu, dim=0, eps=1e-6)
        sigma = torch.dot(iu, part @ iv) + 1e-6
        # realised = part * (softplus(scale) + 0.05) / sigma == part / 3  ->  solve for scale
        target = (sigma / 3.0 - 0.05).clamp_min(1e-3)
        scale = torch.log(torch.expm1(target))
        pre = f"parametrizations.weight.0.parts.{i}." if chunks > 1 else "parametrizations.weight.0."
        keys.update({pre + "_u": u, pre + "_v": v, pre + "scale": scale.reshape(1, 1),
                     pre + "_sn_version": torch.tensor(2)})
        realised = part * (F.softplus(scale) + 0.05) / sigma
        weight[i * part.shape[0]:(i + 1) * part.shape[0]] = realised  # exact value the loader must produce
    return keys


def official_checkpoint(path, key="state_dict"):
    """A checkpoint built to the official key layout (independently of radio_core's writer), and a
    reference forward of what the official model computes with it."""
    import timm

    rng = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=D, depth=2, num_heads=2,
                            num_classes=0, img_size=64).eval()
    teachers = [dict(name="clip", type="open_clip", use_summary=True, model="ViT-H-14", pretrained="dfn5b"),
                dict(name="dino_v2", type="dino_v2", use_summary=True),
                dict(name="sam", type="sam", use_summary=False)]
    num_cls, registers = 3, 8 - 3  # register_multiple 8
    state = {
        "base_model.patch_generator.embedder.weight": torch.randn(D, 3 * P * P, generator=rng) * 0.05,
        "base_model.patch_generator.pos_embed": torch.randn(1, SIDE * SIDE, D, generator=rng) * 0.2,
        "base_model.patch_generator.cls_token.token": torch.randn(num_cls + registers, D, generator=rng) * 0.2,
        "input_conditioner.norm_mean": torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1),
        "input_conditioner.norm_std": torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1),
        "_feature_normalizer.mean": torch.randn(D, generator=rng) * 0.1,
        "_feature_normalizer.tx": torch.eye(D) + 0.05 * torch.randn(D, D, generator=rng),
        "_intermediate_feature_normalizer.alphas": torch.ones(2),
        "_intermediate_feature_normalizer.means": torch.zeros(2, D),
        "_intermediate_feature_normalizer.rotation": torch.eye(D),
        "summary_idxs": torch.tensor([0, 1]),
    }
    blocks = {k: v.clone() for k, v in vit.blocks.state_dict().items()}
    qkv = blocks["0.attn.qkv.weight"]
    fc1 = blocks["1.mlp.fc1.weight"]
    for name, weight, chunks in (("0.attn.qkv", qkv, 3), ("1.mlp.fc1", fc1, 1)):
        for k, v in _sn_parametrize(rng, weight, chunks, training_state=key == "state_dict").items():
            state[f"base_model.blocks.{name}.{k}"] = v
    for k, v in blocks.items():
        if k not in ("0.attn.qkv.weight", "1.mlp.fc1.weight"):
            state[f"base_model.blocks.{k}"] = v
    vit.blocks.load_state_dict(blocks)  # the realised weights: what the official model runs
    heads = {"clip": (_mlp_v2(rng, D, 40, 24, 1), _mlp_v2(rng, D, 40, 20, 1)),
             "dino_v2": (_mlp_v2(rng, D, 40, 16, 1), _mlp_v2(rng, D, 40, 16, 1)),
             "sam": (None, _mlp_v2(rng, D, 40, 12, 1))}
    # both official naming schemes: by index for clip's summary head, by name elsewhere
    for k, v in heads["clip"][0].items():
        state[f"_heads.0.{k}"] = v
    for k, v in heads["clip"][1].items():
        state[f"_feature_projections.clip.{k}"] = v
    for k, v in heads["dino_v2"][0].items():
        state[f"_heads.dino_v2.{k}"] = v
    for k, v in heads["dino_v2"][1].items():
        state[f"_feature_projections.1.{k}"] = v
    for k, v in heads["sam"][1].items():
        state[f"_feature_projections.sam.{k}"] = v
    args = argparse.Namespace(model="vit_tiny_patch16_224", model_kwargs={"embed_dim": D, "depth": 2, "num_heads": 2},
                              cpe_max_size=SIDE * P, teachers=teachers, cls_token_per_teacher=True,
                              register_multiple=8, spectral_reparam=True, mlp_version="v2", dtype=torch.float32,
                              in_chans=None, input_size=None, pretrained=False, num_classes=0, drop=0.0,
                              drop_path=None, drop_block=None, gp=None, bn_momentum=None, bn_eps=None,
                              torchscript=False, initial_checkpoint="")
    torch.save({"args": args, key: state, "epoch": 3}, path)

    @torch.no_grad()
    def reference(images):
        x = (images - state["input_conditioner.norm_mean"]) / state["input_conditioner.norm_std"]
        h, w = x.shape[-2] // P, x.shape[-1] // P
        patches = F.unfold(x, P, stride=P).transpose(1, 2) @ state["base_model.patch_generator.embedder.weight"].T
        grid = state["base_model.patch_generator.pos_embed"].reshape(1, SIDE, SIDE, D).permute(0, 3, 1, 2)
        m = max(h, w)
        pos = F.interpolate(grid, size=(m, m), mode="bilinear", align_corners=False)[..., :h, :w]
        tokens = patches + pos.flatten(2).transpose(1, 2)
        token = state["base_model.patch_generator.cls_token.token"]
        tokens = torch.cat([token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = vit.blocks(tokens)  # model_norm is off: no final norm
        summary, feats = tokens[:, :num_cls], tokens[:, num_cls + registers:]
        feats = (feats - state["_feature_normalizer.mean"]) @ state["_feature_normalizer.tx"].T
        out = {"backbone": (summary[:, [0, 1]].flatten(1), feats.transpose(1, 2).reshape(x.shape[0], D, h, w))}
        for slot, name in enumerate(("clip", "dino_v2", "sam")):
            s_sd, f_sd = heads[name]
            s = _mlp_v2_forward(s_sd, summary[:, slot], 1) if s_sd is not None else None
            f = _mlp_v2_forward(f_sd, feats, 1).transpose(1, 2).reshape(x.shape[0], -1, h, w)
            out[name] = (s, f)
        return out

    return reference


def _compare(outputs, expected):
    assert set(outputs) == set(expected)
    for name, (summary, spatial) in expected.items():
        got = outputs[name]
        if summary is None:
            assert got.summary is None
        else:
            torch.testing.assert_close(got.summary, summary, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.spatial, spatial, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", ["state_dict", "state_dict_ema"])
def test_checkpoint_in_the_official_layout_loads(tmp_path, key):
    path = tmp_path / "radio_tiny.pth.tar"
    reference = official_checkpoint(path, key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every head of this file is supported: no warning
        model = RadioModel.load(path)
    assert sorted(model.adaptors) == ["clip", "dino_v2", "sam"]
    assert model.student.num_cls_tokens == 3 and model.student.num_registers == 5
    assert model.summary_idxs == [0, 1] and model.summary_dim == 2 * D
    assert isinstance(model.feature_normalizer, FeatureNormalizer)
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        _compare(model.adaptor_outputs(images), reference(images))


def test_round_trip_export_then_load_is_identical(tmp_path):
    model = RadioModel.load(_official(tmp_path))
    with torch.no_grad():
        model.feature_normalizer.mean.add_(0.25)  # a non-trivial normaliser must survive the trip
    out_path = model.save_radio(tmp_path / "ours.pth.tar")
    again = RadioModel.load(out_path)
    images = torch.rand(2, 3, 48, 80)
    with torch.no_grad():
        a, b = model.adaptor_outputs(images), again.adaptor_outputs(images)
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert (x is None and y is None) or torch.equal(x, y), name
    # the file is what the official loader expects: args.model + model_kwargs rebuild the same timm blocks
    import timm

    chk = read_checkpoint(out_path)
    args = chk["args"]
    vit = timm.create_model(args.model, pretrained=False, num_classes=0, **args.model_kwargs)
    ours = {k[len("base_model.blocks."):]: v.shape for k, v in chk["state_dict"].items()
            if k.startswith("base_model.blocks.")}
    assert ours == {k: v.shape for k, v in vit.blocks.state_dict().items()}
    assert [t["name"] for t in args.teachers] == ["clip", "dino_v2", "sam"]
    assert chk["state_dict"]["base_model.patch_generator.cls_token.token"].shape[0] == 3 + args.cpe_num_registers


def _official(tmp_path):
    path = tmp_path / "official.pth.tar"
    official_checkpoint(path)
    return path


def test_round_trip_of_a_trained_distiller_with_a_spatial_only_teacher(tmp_path, registry):
    """Our own layout (2 CLS tokens, SAM without one, a ReLU v1 head) survives export/import."""
    from radio_core.models.distiller import Distiller, HeadSpec

    torch.manual_seed(0)
    student = registry.build("student", "vit", model="vit_tiny", embed_dim=D, depth=2, num_heads=2,
                             cpe_max_size=128, num_registers=2, spectral_reparam=True, num_cls_tokens=2)
    mlp = lambda out, **kw: registry.build("adaptor", "mlp", in_dim=D, out_dim=out, hidden_dim=24, **kw)  # noqa: E731
    distiller = Distiller(student, [HeadSpec("clip", 24, 20), HeadSpec("dino", 16, 16), HeadSpec("sam", None, 12)],
                          {"clip": mlp(24, num_inner=1), "dino": mlp(16, activation="relu")},
                          {"clip": mlp(20), "dino": mlp(16), "sam": mlp(12, num_inner=2)})
    config = {"student": {"name": "vit"}, "teachers": {"clip": {"plugin": "clip"}, "dino": {"plugin": "dinov2"},
                                                      "sam": {"plugin": "sam"}}}
    distiller.train()
    distiller(torch.rand(2, 3, 64, 64))  # move the σReparam estimates off their init
    model = RadioModel(distiller.eval(), config)
    path = model.save_radio(tmp_path / "ours.pth.tar")
    again = RadioModel.load(path)
    assert again.config["teachers"]["sam"]["plugin"] == "sam"
    assert again.distiller.summary_slots == {"clip": 0, "dino": 1}
    images = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        a, b = model.adaptor_outputs(images), again.adaptor_outputs(images)
    assert set(a) == set(b) == {"backbone", "clip", "dino", "sam"}
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert (x is None and y is None) or torch.allclose(x, y, rtol=1e-5, atol=1e-6), name


def _pwn(*args):  # what a malicious checkpoint would run on load
    with open(os.environ[MARKER], "w") as f:
        f.write("pwned")
    return {}


class Evil:
    def __reduce__(self):
        return (_pwn, ("rm -rf ~",))


def test_a_pickle_with_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER, str(marker))
    path = tmp_path / "evil.pth.tar"
    torch.save({"args": argparse.Namespace(model="vit_base_patch16_224"), "state_dict": {}, "extra": Evil()}, path)
    with pytest.raises(RadioFormatError, match="refused to unpickle.*_pwn"):
        RadioModel.load(path)
    assert not marker.exists()
    with pytest.raises(RadioFormatError, match="not a RADIO checkpoint"):
        torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pth")
        read_checkpoint(tmp_path / "plain.pth")


def test_unsupported_models_and_heads_are_named(tmp_path):
    path = tmp_path / "other.pth.tar"
    args = argparse.Namespace(model="convnext_tiny", cpe_max_size=None, teachers=[{"name": "clip"}])
    torch.save({"args": args, "state_dict": {"base_model.stem.0.weight": torch.zeros(4, 3, 3, 3)}}, path)
    with pytest.raises(RadioFormatError, match="'convnext_tiny' is not supported: ViT students with CPE .* E-RADIO"):
        load_radio_checkpoint(path)
    args = argparse.Namespace(model="eradio", model_kwargs={"layer_scale": 1e-5}, teachers=[{"name": "clip"}])
    torch.save({"args": args, "state_dict": {"base_model.patch_embed.conv_down.0.conv.weight": torch.zeros(4)}}, path)
    with pytest.raises(RadioFormatError, match=r"model_kwargs \['layer_scale'\] change E-RADIO"):
        load_radio_checkpoint(path)

    official = _official(tmp_path)
    chk = torch.load(official, weights_only=False)
    chk["args"].teachers[0]["fd_upsample_factor"] = 2
    torch.save(chk, official)
    with pytest.warns(UserWarning, match="clip.*fd_upsample_factor"):
        imported = load_radio_checkpoint(official)
    assert "clip" in imported.skipped and "clip" not in imported.distiller.spatial_heads
    assert "clip" in imported.distiller.summary_heads  # its summary head is still fine
    with pytest.raises(RadioFormatError, match="fd_upsample_factor"):
        load_radio_checkpoint(official, adaptor_names=["clip"])
    with pytest.raises(RadioFormatError, match="no teacher \\['siglip'\\]"):
        load_radio_checkpoint(official, adaptor_names=["siglip"])


def test_only_students_the_official_loader_builds_export_to_radio_format(tmp_path, registry):
    """The ViT-CPE student and the official E-RADIO at a preset; not E-RADIO lite, not a resized E-RADIO."""
    from radio_core.models.distiller import Distiller, HeadSpec

    for plugin, args, match in (("eradio_lite", {"variant": "tiny"}, "only the ViT-CPE student.*and the official "
                                 "E-RADIO.*eradio_lite.*RadioModel.save"),
                                ("eradio", {"model": "eradio_xxxtiny", "dim": 16, "depths": [1, 1, 1, 1]},
                                 "only at its presets .*dim=16 \\(preset 32\\), depths=.*RadioModel.save")):
        student = registry.build("student", plugin, **args, num_cls_tokens=1)
        head = registry.build("adaptor", "mlp", in_dim=student.embed_dim, out_dim=8, hidden_dim=8)
        model = RadioModel(Distiller(student, [HeadSpec("clip", 8, None)], {"clip": head}, {}),
                           {"student": {"name": plugin}})
        with pytest.raises(RadioFormatError, match=match):
            model.save_radio(tmp_path / "x.pth.tar")
        with torch.no_grad():
            assert math.isfinite(float(model(torch.rand(1, 3, 64, 64)).summary.sum()))
        assert not (tmp_path / "x.pth.tar").exists()
