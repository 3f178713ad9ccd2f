"""The optimiser's parameter groups: which parameters weight decay reaches."""
import torch

from radio_core.recipe import load_recipe
from radio_core.models.spectral import SpectralReparam
from radio_core.train.loop import Trainer

from helpers import tiny_recipe


def test_weight_decay_reaches_matrices_and_sigma_reparam_gains_only(tmp_path):
    path = tiny_recipe(tmp_path, "student.args.spectral_reparam=true", "student.args.init_values=0.1",
                       "optim.weight_decay=0.5")
    trainer = Trainer(load_recipe(path))
    names = {id(p): n for n, p in trainer.unwrapped.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in trainer.optimizer.param_groups}
    assert set(groups) == {0.5, 0.0}
    decay, no_decay = groups[0.5], groups[0.0]
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    qkv = "student.blocks.0.attn.qkv.parametrizations.weight"
    # σReparam: the weight and every gain (q, k, v separately) decay; W_hat does not depend on |W|,
    # so without the gains in the decay group weight decay would be inert.
    assert {f"{qkv}.original", *(f"{qkv}.0.parts.{i}.scale" for i in range(3)),
            "student.blocks.0.mlp.fc1.parametrizations.weight.0.scale",
            "student.blocks.1.attn.proj.parametrizations.weight.0.scale",
            "summary_heads.clip.fc1.weight", "spatial_heads.sam.final.2.weight",
            "student.patch_generator.embedder.weight"} <= decay
    assert {"student.blocks.0.attn.qkv.bias", "student.blocks.0.norm1.weight", "student.blocks.0.ls1.gamma",
            "student.patch_generator.pos_embed", "student.patch_generator.cls_token.token",
            "summary_heads.clip.final.0.weight"} <= no_decay
    scales = [n for n in names.values() if n.endswith(".scale")]
    assert len(scales) == 2 * 6 and set(scales) <= decay  # 2 blocks x (q, k, v, proj, fc1, fc2)

    # One AdamW step with zero gradients is pure decay: it must change what the student computes.
    student = trainer.unwrapped.student
    attn = student.blocks[0].attn
    before = attn.qkv.weight.detach().clone()
    for p in trainer.unwrapped.parameters():
        p.grad = torch.zeros_like(p)
    for g in trainer.optimizer.param_groups:
        g["lr"] = 0.1  # the schedule's warm-up starts at 0
    trainer.optimizer.step()
    reparam = attn.qkv.parametrizations.weight[0].parts[0]
    assert isinstance(reparam, SpectralReparam)
    assert not torch.allclose(attn.qkv.weight.detach(), before, rtol=1e-3, atol=0)
