"""LoRA adapters on a student (``peft``: a well-kept library, not hand-written low-rank layers).

``apply_lora`` injects peft's LoRA layers into the student's Linear layers named in
``target_modules`` and leaves only them trainable; the layer keeps its name, its weight moves to
``<layer>.base_layer.weight`` and the adapters sit beside it (``lora_A`` / ``lora_B``).
``merged_state_dict`` gives the plain state dict (each base weight plus its low-rank update, the
adapter keys gone) that exports write, so an exported model needs no peft to load.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

ADAPTER = "default"


def apply_lora(student: nn.Module, spec: Any) -> list[str]:
    """LoRA (rank ``spec.r``, scale ``spec.alpha / r``, dropout ``spec.dropout``) on the Linear layers
    of ``student`` whose names end with one of ``spec.target_modules``; returns their names."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ImportError(f"student.init.train: lora needs peft (pip install 'radio-distill[finetune]'): {exc}") from None
    if any(".parametrizations." in k for k in student.state_dict()):
        raise ValueError("student.init.train: lora cannot wrap σReparam layers; set student.args.spectral_reparam: false")
    targets = [name for name, m in student.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] in spec.target_modules]
    if not targets:
        raise ValueError(f"student.init.lora.target_modules: no Linear layer of the student is named "
                         f"{', '.join(spec.target_modules)}")
    config = LoraConfig(r=int(spec.r), lora_alpha=float(spec.alpha), lora_dropout=float(spec.dropout),
                        target_modules=list(spec.target_modules), bias="none")
    inject_adapter_in_model(config, student, adapter_name=ADAPTER)
    return targets


def has_lora(module: nn.Module) -> bool:
    return any(".lora_A." in k for k in module.state_dict())


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merged_state_dict(module: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``state`` (default: ``module.state_dict()``) with every LoRA layer's base weight plus its
    low-rank update under the plain layer's keys, the adapters' keys removed."""
    state = dict(module.state_dict() if state is None else state)
    if not has_lora(module):
        return state
    for name, layer in _lora_layers(module):
        prefix = f"{name}." if name else ""
        base = state.pop(f"{prefix}base_layer.weight")
        state[f"{prefix}weight"] = (base + layer.get_delta_weight(ADAPTER).to(base)).contiguous()
        if f"{prefix}base_layer.bias" in state:
            state[f"{prefix}bias"] = state.pop(f"{prefix}base_layer.bias")
        for key in [k for k in state if k.startswith(f"{prefix}lora_")]:
            del state[key]
    return state


def plain_keys(state: dict[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """A plain state dict (``<layer>.weight``) keyed for ``module``, whose LoRA layers hold their
    weight at ``<layer>.base_layer.weight``: what loads a released model under the adapters."""
    if not has_lora(module):
        return state
    moved = {f"{name}." if name else "" for name, _ in _lora_layers(module)}
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        out[f"{prefix}.base_layer.{leaf}" if f"{prefix}." in moved else key] = value
    return out
