"""The project's own E-RADIO re-design (plugin ``eradio_lite``), tiny variant."""
import pytest
import torch
import torch.nn.functional as F
from radio_plugins.eradio_lite import WindowAttention, build_eradio_lite_student as build_eradio_student


def tiny(**kw):
    torch.manual_seed(0)
    return build_eradio_student("tiny", **kw)


@pytest.mark.parametrize("size, patch", [((64, 64), 16), ((96, 160), 16), ((48, 80), 8)])
def test_forward_backward_at_two_sizes(size, patch):
    student = tiny(num_cls_tokens=2, window_size=2, patch_size=patch).train()
    assert student.patch_size == patch and student.size_multiple == 2 * patch
    h, w = size
    out = student(torch.rand(2, 3, h, w))
    assert out.grid == (h // patch, w // patch)
    assert out.patches.shape == (2, (h // patch) * (w // patch), student.embed_dim)
    assert out.summary.shape == (2, 2, student.embed_dim)
    (out.patches.pow(2).mean() + out.summary.mean()).backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None]
    assert not missing, missing


def test_contract_and_summary_modes(registry):
    student = registry.build("student", "eradio_lite", variant="tiny", num_cls_tokens=3, summary="repeat")
    assert student.patch_size == 16 and student.size_multiple == 32 and student.embed_dim == 64
    student.eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        a, b = student(x), student(x)
    assert torch.equal(a.patches, b.patches)  # eval is deterministic (BN running stats)
    assert torch.equal(a.summary[:, 0], a.summary[:, 2])  # repeat: every slot is the mean feature
    torch.testing.assert_close(a.summary[:, 0], a.patches.mean(dim=1))
    projected = tiny(num_cls_tokens=3, summary="project").eval()
    with torch.no_grad():
        c = projected(x)
    assert not torch.allclose(c.summary[:, 0], c.summary[:, 1])
    with pytest.raises(ValueError, match="multiple of 32"):
        student(torch.rand(1, 3, 48, 64))
    with pytest.raises(ValueError, match="unknown variant 'xl'"):
        build_eradio_student("xl")


def test_window_attention_masks_padding():
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, window=2).eval()
    x = torch.randn(1, 3, 5, 8)  # 3x5 map: windows of 2 overrun -> padding
    with torch.no_grad():
        out = attn(x)
        # reference: attention over each window's real tokens only
        ref = torch.zeros_like(x)
        for y0 in range(0, 3, 2):
            for x0 in range(0, 5, 2):
                win = x[:, y0:y0 + 2, x0:x0 + 2]
                hh, ww = win.shape[1:3]
                ref[:, y0:y0 + hh, x0:x0 + ww] = attn._attend(win.reshape(1, hh * ww, 8), None).reshape(1, hh, ww, 8)
        torch.testing.assert_close(out, ref)
        # one window covering the map is plain global attention
        big = WindowAttention(8, 2, window=8).eval()
        big.load_state_dict(attn.state_dict())
        tokens = x.reshape(1, 15, 8)
        q, k, v = big.qkv(tokens).reshape(1, 15, 3, 2, 4).permute(2, 0, 3, 1, 4)
        expect = big.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 15, 8))
        torch.testing.assert_close(big(x), expect.reshape(1, 3, 5, 8))


def test_each_teacher_reads_its_own_summary_and_resampling_is_learned(registry):
    """Default: a learned query per summary slot (distinct summaries that respond to the image);
    the subsampled attention branch resamples with a strided conv and a transposed conv."""
    from torch import nn

    student = registry.build("student", "eradio_lite", variant="tiny", num_cls_tokens=3).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = student(x)
    s = out.summary
    assert s.shape == (2, 3, student.embed_dim)
    for i, j in ((0, 1), (0, 2), (1, 2)):  # near the mean at init, but each slot its own
        assert (s[:, i] - s[:, j]).abs().max() > 1e-5
    assert not torch.allclose(s[0], s[1])  # depends on the image
    sub = student.stage2[0]
    assert sub.subsample == 2 and isinstance(sub.down, nn.Conv2d) and sub.down.stride == (2, 2)
    assert isinstance(sub.up, nn.ConvTranspose2d) and sub.up.stride == (2, 2)
    assert not hasattr(student.stage2[1], "down")
    student.train()
    out = student(x)
    out.summary[:, 1].sum().backward()
    assert student.summary_pool.query.grad[1].abs().sum() > 0 and student.summary_pool.query.grad[0].abs().sum() == 0
    assert sub.down.weight.grad is not None and sub.up.weight.grad is not None


def test_summary_pool_equals_attention_over_projected_tokens_in_value_and_gradient():
    """The pool moves W_k/W_v onto the queries; it must stay the same function (and gradient)
    as attending with keys and values projected from every token."""
    from radio_plugins.eradio_lite import AttentionPool

    torch.manual_seed(0)
    pool = AttentionPool(48, num_queries=3, num_heads=4).double()
    with torch.no_grad():  # a non-trivial bias and norm, so no term can vanish by initialisation
        for p in pool.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 37, 48, dtype=torch.float64, requires_grad=True)
    fast, slow = pool(x), pool.reference(x)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    g_fast = torch.autograd.grad(fast.square().sum(), [x, *pool.parameters()])
    g_slow = torch.autograd.grad(slow.square().sum(), [x, *pool.parameters()])
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_patch_size_8_keeps_the_layout_at_half_the_stride():
    """Patch 8 changes only the first stem convolution's stride: the same parameters, and at
    twice the input size the same token grid as patch 16."""
    a, b = tiny(patch_size=16), tiny(patch_size=8)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
    assert b.stem[0][0].stride == (1, 1) and a.stem[0][0].stride == (2, 2)
    assert b(torch.rand(1, 3, 64, 64)).grid == a(torch.rand(1, 3, 128, 128)).grid == (8, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        b(torch.rand(1, 3, 64, 72))
    with pytest.raises(ValueError, match="patch_size .* must be 8 or 16, got 14"):
        tiny(patch_size=14)
