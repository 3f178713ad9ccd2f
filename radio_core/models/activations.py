"""MLP activations by name, for students and the formats that describe them.

Names are transformers' (``RadioConfig.hidden_act``); each maps to the timm name an official RADIO
file writes as ``model_kwargs.act_layer`` (``timm.layers.get_act_layer`` builds it). ``gelu`` is
the exact (erf) GELU of timm's and RADIO's ViTs.
"""
from __future__ import annotations

HIDDEN_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu",
               "silu": "silu"}


def timm_activation(hidden_act: str, owner: str) -> str:
    """timm's name of ``hidden_act``; ValueError naming ``owner`` for an unknown one."""
    if hidden_act not in HIDDEN_ACTS:
        raise ValueError(f"{owner}: hidden_act must be one of {', '.join(HIDDEN_ACTS)}, got {hidden_act!r}")
    return HIDDEN_ACTS[hidden_act]


def from_timm_activation(name: str) -> str | None:
    """The transformers name of timm's activation ``name`` (None: not one the table has)."""
    return {v: k for k, v in HIDDEN_ACTS.items()}.get(name)
