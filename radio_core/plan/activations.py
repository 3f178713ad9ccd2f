"""Bytes a training forward keeps for backward, as a GPU run would store them (for the planner).

Models are built on the meta device, where CUDA autocast does nothing and attention runs the
math path that keeps the full attention matrix. ``GpuStorage`` (a ``TorchFunctionMode``, so it
sits above autograd like autocast does) makes the meta forward store what a GPU forward stores:

* under mixed precision, the inputs of the ops CUDA autocast runs in low precision (linear,
  matmul, convolutions, attention, ...) are cast to bf16/fp16 and the ops it runs in float32
  (layer/group norm, softmax, normalisation, losses) get float32 inputs; every other op follows
  type promotion, as on the GPU (so a float32 residual stream stays float32);
* ``scaled_dot_product_attention`` keeps what the fused kernels keep (q, k, v, the output and a
  float32 log-sum-exp per query), not the (N x N) attention matrix.

``saved_bytes`` counts the storage of every tensor autograd saves (``saved_tensors_hooks``), once
per storage, leaving out the model's own parameters; with activation checkpointing that is each
checkpointed block's input, since its inside is recomputed.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: ops CUDA autocast runs in the low-precision dtype (the ones ViT/ConvNet students use)
LOW_PRECISION = {
    F.linear, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm,
    torch.addmm, torch.baddbmm, torch.addbmm, torch.einsum, F.conv1d, F.conv2d, F.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.scaled_dot_product_attention,
}
#: ops CUDA autocast runs in float32
FLOAT32 = {
    F.layer_norm, F.group_norm, F.softmax, torch.softmax, Tensor.softmax, F.log_softmax, torch.log_softmax,
    F.normalize, F.cosine_similarity, F.smooth_l1_loss, F.mse_loss, F.l1_loss, F.softplus, torch.exp,
    Tensor.exp, torch.norm, Tensor.norm, torch.sum, Tensor.sum,
}


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel: saves q, k, v, out and a float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # zeros, not empty: on a real device the values flow on into the student's outputs,
        # which are checked to be finite (uninitialised memory can hold NaN)
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # pragma: no cover - the planner never runs backward here
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class GpuStorage(TorchFunctionMode):
    """See the module docstring; ``dtype`` None: no mixed precision (float32 everywhere)."""

    def __init__(self, dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None and func in LOW_PRECISION:
            args, kwargs = _cast((args, kwargs), self.dtype)
        elif self.dtype is not None and func in FLOAT32:
            args, kwargs = _cast((args, kwargs), torch.float32)
        if func is F.scaled_dot_product_attention and not kwargs.get("need_weights"):
            q, k, v = args[:3]
            return _FusedAttention.apply(q, k, v)
        return func(*args, **kwargs)


def _cast(tree, dtype: torch.dtype):
    if isinstance(tree, Tensor):
        return tree.to(dtype) if tree.is_floating_point() and tree.dtype != dtype else tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cast(x, dtype) for x in tree)
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return tree


def saved_bytes(forward: Callable[[], object], dtype: Optional[torch.dtype],
                module: Optional[torch.nn.Module] = None) -> float:
    """Bytes of every tensor autograd saves while ``forward()`` runs under ``GpuStorage(dtype)``,
    leaving out tensors that are ``module``'s own parameters or buffers (already in memory)."""
    resident = {t.untyped_storage()._cdata for t in (*module.parameters(), *module.buffers())} if module else set()
    kept: dict[int, int] = {}  # storage -> bytes: views and expanded tensors share their storage

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in resident:
            kept[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), GpuStorage(dtype):
        out = forward()
    del out
    return float(sum(kept.values()))


__all__ = ["GpuStorage", "saved_bytes", "LOW_PRECISION", "FLOAT32"]
