"""ViT-CPE student (plugin ``vit``): any resolution, CPE crops, ViTDet windows, registers."""
import pytest
import torch
import torch.nn.functional as F
from radio_plugins.vit import build_vit_student

TINY = dict(model="vit_tiny", embed_dim=32, depth=2, num_heads=2, cpe_max_size=256)


def tiny(**kw):
    torch.manual_seed(0)
    return build_vit_student(**{**TINY, **kw})


def test_any_resolution_and_aspect_with_the_same_weights():
    student = tiny(num_cls_tokens=2, num_registers=3).eval()
    for h, w in [(224, 224), (256, 256), (432, 432), (320, 480)]:
        with torch.no_grad():
            out = student(torch.rand(1, 3, h, w))
        assert out.grid == (h // 16, w // 16)
        assert out.patches.shape == (1, (h // 16) * (w // 16), 32)  # registers excluded
        assert out.summary.shape == (1, 2, 32)
        assert torch.isfinite(out.patches).all()
        assert out.spatial().shape == (1, 32, h // 16, w // 16)


def test_eval_positions_are_resize_then_top_left_crop():
    student = tiny().eval()
    pg = student.patch_generator
    side = pg.grid_side
    grid = pg.pos_embed.detach().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    # full grid: positions are the parameter itself
    torch.testing.assert_close(pg.position_grid(1, side, side)[0], pg.pos_embed.detach()[0])
    # 20x30 tokens: resize to 30x30 (bilinear, align_corners=False), keep the top-left 20x30
    expect = F.interpolate(grid, size=(30, 30), mode="bilinear", align_corners=False)[..., :20, :30]
    torch.testing.assert_close(pg.position_grid(1, 20, 30)[0], expect.flatten(2).transpose(1, 2)[0])


def test_cpe_training_crops_differ_per_sample_and_batch_eval_is_deterministic():
    student = tiny(pos_dropout=0.0)
    x = torch.rand(1, 3, 64, 64).expand(2, -1, -1, -1)  # the same image twice in a batch
    student.train()
    a, b = student(x), student(x)
    assert not torch.allclose(a.patches, b.patches)  # a new crop per batch
    assert not torch.allclose(a.patches[0], a.patches[1])  # and per sample
    torch.manual_seed(7)
    c = student(x)
    torch.manual_seed(7)
    d = student(x)
    assert torch.equal(c.patches, d.patches)  # training randomness follows the global seed
    student.eval()
    e, f = student(x), student(x)
    assert torch.equal(e.patches, f.patches)
    assert torch.equal(e.patches[0], e.patches[1])


def test_position_dropout_drops_whole_samples():
    student = tiny(pos_dropout=1.0).train()
    assert torch.count_nonzero(student.patch_generator.position_grid(3, 4, 5)) == 0
    student = tiny(pos_dropout=0.0).train()
    assert (student.patch_generator.position_grid(3, 4, 5).abs().sum(dim=(1, 2)) > 0).all()


def _manual_windowed(student, x, ws):
    """Reference: block 0 windowed (loop over windows, summary tokens untouched), block 1 global."""
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    xn = (x - student.norm_mean) / student.norm_std
    tokens = student.patch_generator(xn)
    k = student.num_prefix_tokens
    prefix, patches = tokens[:, :k], tokens[:, k:].clone()
    out = patches.clone()
    for wy in range(h // ws):
        for wx in range(w // ws):
            idx = torch.tensor([(wy * ws + i) * w + wx * ws + j for i in range(ws) for j in range(ws)])
            out[:, idx] = student.blocks[0](patches[:, idx])
    tokens = student.blocks[1](torch.cat([prefix, out], dim=1))
    tokens = student.norm(tokens)
    return tokens[:, :student.num_cls_tokens], tokens[:, k:]


def test_windowed_and_global_modes():
    student = tiny(num_cls_tokens=2, num_registers=1, global_every=2).eval()
    x = torch.rand(2, 3, 64, 96)  # 4x6 tokens
    with torch.no_grad():
        glob = student(x)
        student.set_window_size(2)
        assert student.size_multiple == 32
        win = student(x)
        ref_summary, ref_patches = _manual_windowed(student, x, 2)
    assert win.patches.shape == glob.patches.shape and win.summary.shape == glob.summary.shape
    assert win.grid == glob.grid
    assert not torch.allclose(win.patches, glob.patches)
    torch.testing.assert_close(win.patches, ref_patches)
    torch.testing.assert_close(win.summary, ref_summary)
    with pytest.raises(ValueError, match="multiples of 32"):
        student(torch.rand(1, 3, 48, 64))
    student.set_window_size(None)
    assert student.size_multiple == 16


def test_training_draws_window_sizes_and_skips_ones_that_do_not_tile(monkeypatch):
    student = tiny(window_sizes=[2, None], global_every=2).train()
    chosen = []
    real = student._run_blocks
    monkeypatch.setattr(student, "_run_blocks", lambda t, h, w, ws, taps: chosen.append(ws) or real(t, h, w, ws, taps))
    for _ in range(12):
        student(torch.rand(1, 3, 64, 64))
    assert set(chosen) == {2, None}
    chosen.clear()
    for _ in range(4):
        student(torch.rand(1, 3, 48, 48))  # 3x3 tokens: window 2 does not tile -> global only
    assert set(chosen) == {None}
    out = student(torch.rand(2, 3, 64, 64))
    (out.patches.sum() + out.summary.sum()).backward()


def test_registry_build_with_spectral_reparam_and_backward(registry):
    from radio_core.models.spectral import has_spectral_reparam

    student = registry.build("student", "vit", **TINY, spectral_reparam=True, window_sizes=[2],
                             global_every=2, num_cls_tokens=3)
    assert has_spectral_reparam(student.blocks)
    assert student.embed_dim == 32 and student.patch_size == 16 and student.num_cls_tokens == 3
    out = student.train()(torch.rand(2, 3, 64, 64))
    assert out.summary.shape == (2, 3, 32)
    out.patches.mean().backward()
    assert student.patch_generator.pos_embed.grad is not None


def test_presets_and_bad_names():
    from radio_plugins.vit import parse_model_name

    assert parse_model_name("vit_huge_patch16_224") == ((1280, 32, 16), 16, False)
    assert parse_model_name("vit_base") == ((768, 12, 12), 16, False)
    assert parse_model_name("vit_large_patch14_224_mlpnorm") == ((1024, 24, 16), 14, True)
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        build_vit_student("resnet50")
    with torch.device("meta"):  # the planner builds students on the meta device
        student = build_vit_student("vit_huge_patch16_224", num_cls_tokens=3, register_multiple=8)
        out = student.train()(torch.rand(1, 3, 64, 64))
    assert student.num_registers == 5 and out.summary.shape == (1, 3, 1280)


def test_pretrained_from_a_local_timm_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                            img_size=64, num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    student = tiny(pretrained=str(path), num_cls_tokens=2)
    torch.testing.assert_close(student.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(student.patch_generator.embedder.weight,
                               vit.patch_embed.proj.weight.reshape(32, -1))
    token = student.patch_generator.cls_token.token
    torch.testing.assert_close(token[1], vit.cls_token.reshape(-1))
    with pytest.raises(ValueError, match="shapes differ"):
        build_vit_student("vit_tiny", embed_dim=48, depth=2, num_heads=2, pretrained=str(path))


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = tiny(pos_dropout=0.0).train()
    checkpointed = tiny(pos_dropout=0.0, grad_checkpointing=True).train()
    x = torch.rand(2, 3, 64, 64)
    grads = []
    for student in (plain, checkpointed):
        torch.manual_seed(3)  # same CPE crops
        student(x).patches.pow(2).mean().backward()
        grads.append(student.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_cpe_off_trains_with_the_inference_position_grid():
    """cpe=False (the ablation baseline): training positions are the deterministic resized grid."""
    import torch
    from radio_plugins.vit import build_vit_student

    torch.manual_seed(0)
    s = build_vit_student("vit_tiny", embed_dim=32, depth=1, num_heads=2, cpe=False, pos_dropout=0.0).train()
    x = torch.rand(2, 3, 64, 96)
    a, b = s(x).patches, s(x).patches
    torch.testing.assert_close(a, b)  # no random crop
    torch.testing.assert_close(a, s.eval()(x).patches)
    torch.manual_seed(0)
    c = build_vit_student("vit_tiny", embed_dim=32, depth=1, num_heads=2, pos_dropout=0.0).train()
    assert not torch.allclose(c(x).patches, c(x).patches)  # CPE: a new crop each call


def test_learned_absolute_position_embedding_is_timms_resampled_table():
    """pos_embed=learned (the CPE ablation's baseline): a pos_grid^2 table, used as is at its own
    grid and resampled by timm's resample_abs_pos_embed (bicubic) elsewhere, in training as in
    eval; no crops, no position dropout, and only pos_grid^2 positions to train."""
    from timm.layers import resample_abs_pos_embed

    s = tiny(pos_embed="learned", pos_grid=6, patch_size=8).train()
    pg = s.patch_generator
    assert pg.pos_embed.shape == (1, 36, 32) and pg.pos_dropout == 0.0
    torch.testing.assert_close(pg.position_grid(2, 6, 6), pg.pos_embed)
    expect = resample_abs_pos_embed(pg.pos_embed.detach(), new_size=[10, 8], old_size=[6, 6], num_prefix_tokens=0)
    torch.testing.assert_close(pg.position_grid(2, 10, 8).detach(), expect)
    x = torch.rand(2, 3, 80, 64)
    torch.testing.assert_close(s(x).patches, s.eval()(x).patches)  # deterministic in training too
    # default table size: the model name's resolution / patch (timm's vit_*_patch16_224: 14x14)
    assert build_vit_student("vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2,
                             pos_embed="learned").patch_generator.pos_embed.shape[1] == 14 * 14
    with pytest.raises(ValueError, match="pos_embed"):
        tiny(pos_embed="sincos")


def test_intermediate_layers_are_the_raster_patch_tokens_after_those_blocks():
    student = tiny(depth=3, num_cls_tokens=2, num_registers=1, global_every=3).eval()
    student.intermediate_layers = (1, 2)
    x = torch.rand(2, 3, 64, 96)
    k = student.num_prefix_tokens
    with torch.no_grad():
        out = student(x)
        tokens = student.patch_generator((x - student.norm_mean) / student.norm_std)
        expected = {}
        for i, block in enumerate(student.blocks):
            tokens = block(tokens)
            expected[i + 1] = tokens[:, k:]
    assert sorted(out.intermediates) == [1, 2]
    for i in (1, 2):
        torch.testing.assert_close(out.intermediates[i], expected[i])
    with torch.no_grad():
        student.set_window_size(2)  # windowed blocks: taps come back in raster order
        win = student(x)
    assert win.intermediates[2].shape == expected[2].shape
    student.intermediate_layers = ()
    assert student(x).intermediates == {}


def test_mlpnorm_students_have_the_official_mlp_layernorm():
    """``_mlpnorm``: a LayerNorm (eps 1e-5) on the MLP's hidden features, between GELU and fc2, as
    RADIO's ``vit_*_mlpnorm`` timm models add it; the blocks then compute what timm's do with it."""
    import timm
    from torch import nn

    student = tiny(model="vit_tiny_patch16_224_mlpnorm").eval()
    assert student.arch["mlp_norm"]
    norm = student.blocks[0].mlp.norm
    assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (128,) and norm.eps == 1e-5
    assert "blocks.1.mlp.norm.weight" in student.state_dict()
    with torch.no_grad():
        for block in student.blocks:
            block.mlp.norm.weight.uniform_(0.5, 1.5)
            block.mlp.norm.bias.uniform_(-0.5, 0.5)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0).eval()
    for m in ref.modules():  # the published construction: replace each Mlp's norm by nn.LayerNorm(hidden)
        if isinstance(m, timm.layers.Mlp):
            m.norm = nn.LayerNorm(m.fc1.out_features)
    ref.blocks.load_state_dict(student.blocks.state_dict())
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.equal(student.blocks(x), ref.blocks(x))
    assert not tiny().arch["mlp_norm"] and isinstance(tiny().blocks[0].mlp.norm, nn.Identity)


def test_high_resolution_windows_leave_low_resolution_global(monkeypatch):
    """``window_sizes: [4]`` (the paper recipe's [16] scaled down): windows on an 8x8 token grid,
    global attention where 4 covers the whole grid (4x4) or does not tile it (6x6)."""
    student = tiny(window_sizes=[4], global_every=2).train()
    chosen = []
    real = student._run_blocks
    monkeypatch.setattr(student, "_run_blocks", lambda t, h, w, ws, *rest: chosen.append(ws) or real(t, h, w, ws, *rest))
    for side in (128, 64, 96):
        student(torch.rand(1, 3, side, side))
    assert chosen == [4, None, None]
