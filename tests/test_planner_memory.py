"""The planner's activation memory: what a training forward keeps for backward, as stored."""
import torch
from torch import nn

from radio_core.plan.activations import saved_bytes
from radio_core.plan.planner import student_cost
from radio_core.recipe import validate
from radio_core.models.distiller import build_distiller

VIT = {"model": "vit_small_patch16_224", "depth": 4, "embed_dim": 64, "num_heads": 2, "cpe_max_size": 256}


def _distiller(registry, device="meta", **args):
    recipe = validate({"student": {"name": "vit", "args": {**VIT, **args}},
                       "teachers": {"t": {"plugin": "clip", "args": {"tiny": True}}}})
    torch.manual_seed(0)
    with torch.device(device):
        return build_distiller(recipe, {"t": (32, 48)}, registry)


def test_fp32_estimate_on_meta_matches_a_real_forward(registry):
    """Meta estimate per image == bytes a real CPU forward keeps (fused attention on both sides;
    parameters are not activations)."""
    planned = student_cost(_distiller(registry), (128, 128)).activation_bytes_per_image
    real = _distiller(registry, device="cpu").train()

    def kept(batch):
        x = torch.rand(batch, 3, 128, 128)
        return saved_bytes(lambda: real(x, return_predictions=True), None, real)

    measured = kept(2) - kept(1)
    assert abs(planned - measured) / measured < 0.02, (planned, measured)


def test_mixed_precision_keeps_matmul_inputs_in_bf16_and_norms_in_fp32():
    """A pre-norm MLP block under bf16 autocast as CUDA stores it: the LayerNorm keeps its fp32
    input, the two Linear layers and GELU keep bf16 tensors; the residual stream stays fp32."""
    with torch.device("meta"):
        block = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        x = torch.rand(10, 64, requires_grad=True)
    fp32 = saved_bytes(lambda: block(x) + x, None, block)
    bf16 = saved_bytes(lambda: block(x) + x, torch.bfloat16, block)
    n = 10
    # fp32: LN input + mean/rstd, fc1 input, GELU input, fc2 input (= GELU output)
    assert fp32 == n * 64 * 4 + 2 * n * 4 + n * 64 * 4 + n * 256 * 4 + n * 256 * 4
    # bf16: LN input fp32 + stats; fc1 input bf16; GELU input bf16; fc2 input bf16; bf16 weight copies
    weights = (64 * 256 + 256 * 64) * 2
    assert bf16 == n * 64 * 4 + 2 * n * 4 + n * 64 * 2 + n * 256 * 2 + n * 256 * 2 + weights


def test_checkpointing_and_windows_in_the_estimate(registry):
    plain = student_cost(_distiller(registry, depth=8), (256, 256), mixed_precision="bf16")
    ckpt = student_cost(_distiller(registry, depth=8, grad_checkpointing=True), (256, 256), mixed_precision="bf16")
    assert ckpt.activation_bytes_per_image < plain.activation_bytes_per_image / 3
    assert ckpt.flops_per_image > plain.flops_per_image  # the recompute is counted
    windowed = student_cost(_distiller(registry, depth=8, window_sizes=[4]), (256, 256), mixed_precision="bf16")
    assert windowed.flops_per_image < plain.flops_per_image


def test_a_group_that_does_not_fit_is_named_with_its_levers(tmp_path, capsys):
    from radio_core.run import main

    from helpers import tiny_recipe

    path = tiny_recipe(tmp_path, "data.batch_size=64")
    assert main([str(path), "--dry-run", "--world-size", "1", "--gpu-memory", "0.03"]) == 0
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING"))
    assert "group all" in warning and "0.027 GiB budget of a 0.03 GiB GPU" in warning
    assert "batch " in warning and "train.grad_accum" in warning
    assert "student.args.grad_checkpointing: true" in warning
    assert "train.mixed_precision: bf16" in warning
