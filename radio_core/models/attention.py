"""Attention kernels for students: one function, ``attend``, over selectable backends.

``sdpa``: torch's scaled_dot_product_attention (fused kernels where available); ``xformers``:
xformers' memory_efficient_attention (CUDA only; the optional ``xformers`` extra); ``math``:
softmax(q k^T / sqrt(d) + mask) v written out (a reference; what FLOP counters see). The
built-in ViT and E-RADIO students use it; a third-party student may too (public contract).
"""
from __future__ import annotations

from typing import Optional

import torch


ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
_warned: set[str] = set()


def check_attention_backend(plugin: str, backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"student '{plugin}': attention must be one of {', '.join(ATTENTION_BACKENDS)}, "
                         f"got {backend!r}")
    return backend


def xformers_unavailable(device: torch.device) -> Optional[str]:
    """Why xformers cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"xformers needs a CUDA device, the model runs on {device.type}"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install (torch mismatch) falls back too
        return f"xformers is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    return None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
           backend: str = "sdpa", dropout: float = 0.0) -> torch.Tensor:
    """Multi-head attention of (B, H, N, D) queries, keys and values; ``mask``, broadcastable to
    (B, H, N, M) as for SDPA, is a boolean keep-mask (True = attend) or a floating bias added to
    the logits (E-RADIO's position bias). Returns (B, H, N, D).

    ``xformers`` where it cannot run (no CUDA, not installed) falls back to ``sdpa`` with one
    warning line per reason."""
    if backend == "xformers":
        reason = xformers_unavailable(q.device)
        if reason is None:
            return _xformers_attention(q, k, v, mask, dropout)
        if reason not in _warned:
            _warned.add(reason)
            import warnings

            warnings.warn(f"attention backend xformers unavailable ({reason}); using sdpa", stacklevel=2)
        backend = "sdpa"
    if backend == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
    attn = scores.softmax(dim=-1)
    if dropout:
        attn = torch.nn.functional.dropout(attn, dropout)
    return attn @ v


def _xformers_attention(q, k, v, mask, dropout):
    import xformers.ops as xops

    bias = None
    if mask is not None:
        b, h, n, m = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        # xformers wants an additive bias whose last dimension is 8-aligned in memory
        store = torch.zeros(b, h, n, (m + 7) // 8 * 8, dtype=q.dtype, device=q.device)[..., :m]
        if mask.is_floating_point():
            bias = store.copy_(mask.expand(b, h, n, m))
        else:
            bias = store.masked_fill_(~mask.expand(b, h, n, m), float("-inf"))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, p=dropout)
    return out.transpose(1, 2)
