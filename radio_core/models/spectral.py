"""σReparam: spectral reparametrisation of linear layers (Zhai et al., 2023).

    W_hat = γ / σ(W) · W

σ(W), the largest singular value of W, is estimated by power iteration with persistent
vectors ``u`` and ``v`` (buffers, updated in place by one iteration per forward in training
mode only, so eval is deterministic). γ is a learned scalar initialised to the estimate of σ(W),
so wrapping a layer does not change the function it computes. AM-RADIO used this, with weight
decay, to stop attention-entropy collapse in high-resolution training.

Implemented as a ``torch.nn.utils.parametrize`` parametrization: the layer keeps its class and
its ``weight`` attribute; the state-dict keys become ``<layer>.parametrizations.weight.original``
and ``<layer>.parametrizations.weight.0.{gamma,_u,_v}``. For export, ``remove_spectral_reparam``
bakes W_hat into a plain ``weight`` in place, and ``folded_state_dict`` gives the plain-weight
state dict of a module without touching the module (for exporting while training continues).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

#: power iterations used at wrap time so that γ starts at a converged σ(W).
INIT_POWER_ITERATIONS = 50


class SpectralReparam(nn.Module):
    """The parametrization ``weight -> gamma / sigma(weight) * weight``."""

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"σReparam expects a 2-D weight matrix, got shape {tuple(weight.shape)}")
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        w = weight.detach().float()
        # Deterministic start (no global-RNG draw: wrapping must not shift the training seed).
        v = F.normalize(torch.ones(w.shape[1], device=w.device) + torch.arange(w.shape[1], device=w.device) * 1e-3,
                        dim=0, eps=eps)
        u = F.normalize(w @ v, dim=0, eps=eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        self._power_iteration(w, INIT_POWER_ITERATIONS)
        self.gamma = nn.Parameter(self.sigma(weight).detach().clone().to(weight.dtype))

    @torch.no_grad()
    def _power_iteration(self, w: Tensor, steps: int) -> None:
        for _ in range(steps):
            self._v.copy_(F.normalize(w.t() @ self._u, dim=0, eps=self.eps))
            self._u.copy_(F.normalize(w @ self._v, dim=0, eps=self.eps))

    def sigma(self, weight: Tensor) -> Tensor:
        """σ(W) ≈ uᵀ W v with the current (detached) singular-vector estimates."""
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return torch.dot(u, torch.mv(weight.float(), v))

    def forward(self, weight: Tensor) -> Tensor:
        if self.training:
            self._power_iteration(weight.detach().float(), self.n_power_iterations)
        scale = self.gamma.float() / self.sigma(weight).clamp_min(self.eps)
        return (weight.float() * scale).to(weight.dtype)


def is_linear(name: str, module: nn.Module) -> bool:  # noqa: ARG001 - filter signature
    return isinstance(module, nn.Linear)


def apply_spectral_reparam(module: nn.Module, filter: Optional[Callable[[str, nn.Module], bool]] = None,
                           n_power_iterations: int = 1, eps: float = 1e-6) -> list[str]:
    """Wrap every ``nn.Linear`` under ``module`` for which ``filter(name, layer)`` is true.

    Returns the names of the wrapped layers. Layers already wrapped are left alone.
    """
    chosen = filter or is_linear
    wrapped = []
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, nn.Linear) or not chosen(name, layer):
            continue
        if parametrize.is_parametrized(layer, "weight"):
            continue
        parametrize.register_parametrization(
            layer, "weight", SpectralReparam(layer.weight, n_power_iterations=n_power_iterations, eps=eps))
        wrapped.append(name)
    return wrapped


def has_spectral_reparam(module: nn.Module) -> bool:
    return any(isinstance(m, SpectralReparam) for m in module.modules())


def remove_spectral_reparam(module: nn.Module) -> int:
    """Bake W_hat into a plain ``weight`` (no power-iteration step is taken); returns the count."""
    count = 0
    for layer in list(module.modules()):
        plist = getattr(layer, "parametrizations", None)
        if plist is None or "weight" not in plist:
            continue
        if not any(isinstance(p, SpectralReparam) for p in plist["weight"]):
            continue
        was_training = plist["weight"].training
        plist["weight"].eval()  # evaluating in train mode would run one more power iteration
        try:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        finally:
            if was_training:
                layer.train()
        count += 1
    return count


@torch.no_grad()
def folded_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every σReparam layer's keys replaced by its plain ``weight``.

    The module is left as it is (buffers are not advanced).
    """
    state = module.state_dict()
    for name, layer in module.named_modules():
        plist = getattr(layer, "parametrizations", None)
        if plist is None or "weight" not in plist:
            continue
        chain = plist["weight"]
        if not any(isinstance(p, SpectralReparam) for p in chain):
            continue
        prefix = f"{name}." if name else ""
        w = chain.original
        for p in chain:
            was_training = p.training
            p.eval()
            try:
                w = p(w)
            finally:
                p.train(was_training)
        for key in [k for k in state if k.startswith(f"{prefix}parametrizations.weight.")]:
            del state[key]
        state[f"{prefix}weight"] = w.detach().clone()
    return state
