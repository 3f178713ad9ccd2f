"""σReparam: spectral reparametrisation of linear layers (Zhai et al., 2023), RADIO's v2 form.

    W_hat = (softplus(s) + α) / σ(W) · W          (α = 0.05)

σ(W), the largest singular value of W, is estimated by power iteration with persistent
vectors ``u`` and ``v`` (buffers, updated in place by one iteration per forward in training
mode only, so eval is deterministic); σ = uᵀWv + eps. Each iteration updates u = normalize(Wv)
first, then v = normalize(Wᵀu): the order and train/eval semantics of torch's ``spectral_norm``,
which the official σReparam subclasses (tests/test_spectral.py compares trajectories with both). The learned gain is the parameter ``scale``
``s``, kept **2-D** (1, 1) so that the optimiser's "decay everything with ndim >= 2" rule applies
weight decay to it: W_hat does not depend on W's norm, so decaying W alone would be inert; decaying
``s`` pulls the gain of every layer towards softplus(0) + α. ``s`` starts where the gain equals
the converged σ(W), so wrapping a layer does not change the function it computes. AM-RADIO used
this, with weight decay 0.02, to stop attention-entropy collapse in high-resolution training.

The fused ``qkv`` projection of attention gets one σ and one gain per part (q, k and v each:
``ChunkedSpectralReparam`` with 3 parts), as the official v2 form does. Version 1 (the gain is
``s`` itself) is kept for reading older files (``_sn_version`` buffer = 1).

Implemented as a ``torch.nn.utils.parametrize`` parametrization with the official key names:
the layer keeps its class and ``weight`` attribute; the state-dict keys are
``<layer>.parametrizations.weight.original`` and ``<layer>.parametrizations.weight.0.{scale,_u,_v,
_sn_version}`` (``...weight.0.parts.<i>.*`` for qkv). ``realise`` is the one formula used both
here and when importing official checkpoints. For export, ``remove_spectral_reparam`` bakes W_hat
into a plain ``weight`` in place, and ``folded_state_dict`` gives the plain-weight state dict of a
module without touching it (for exporting while training continues).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

#: power iterations used at wrap time so that the gain starts at a converged σ(W).
INIT_POWER_ITERATIONS = 50
#: the v2 form's floor on the gain: softplus(scale) + ALPHA.
ALPHA = 0.05
#: smallest gain - ALPHA that initialisation represents (as in the official code).
_MIN_INIT = 1e-5


def gain(scale: Tensor, version: int, alpha: float = ALPHA) -> Tensor:
    """The realised numerator of W_hat: softplus(scale) + alpha (v2) or scale (v1), 0-d float."""
    scale = scale.float().reshape(())
    if version == 2:
        return F.softplus(scale) + alpha
    if version == 1:
        return scale
    raise ValueError(f"unsupported σReparam version {version} (1 and 2 exist)")


def realise(weight: Tensor, u: Tensor, v: Tensor, scale: Tensor, version: int, eps: float,
            alpha: float = ALPHA) -> Tensor:
    """W_hat = gain / (uᵀWv + eps) · W, computed in float32, returned in W's dtype."""
    sigma = torch.dot(u.float(), torch.mv(weight.float().reshape(weight.shape[0], -1), v.float())) + eps
    return (weight.float() * (gain(scale, version, alpha) / sigma)).to(weight.dtype)


@torch.no_grad()
def power_iteration(weight: Tensor, u: Tensor, v: Tensor, steps: int, eps: float) -> tuple[Tensor, Tensor]:
    """``steps`` power iterations from (u, v), in the order of torch's ``spectral_norm`` (and so of
    the official code, which reuses it): u = normalize(W v), then v = normalize(Wᵀ u)."""
    w = weight.float().reshape(weight.shape[0], -1)
    u, v = u.float(), v.float()
    for _ in range(steps):
        u = F.normalize(torch.mv(w, v), dim=0, eps=eps)
        v = F.normalize(torch.mv(w.t(), u), dim=0, eps=eps)
    return u, v


def _inverse_softplus(t: Tensor) -> Tensor:
    return t + torch.log(-torch.expm1(-t))  # log(exp(t) - 1) without overflow


class SpectralReparam(nn.Module):
    """The parametrization ``weight -> gain(scale) / σ(weight) · weight``."""

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, eps: float = 1e-6, version: int = 2,
                 alpha: float = ALPHA) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"σReparam expects a 2-D weight matrix, got shape {tuple(weight.shape)}")
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        if version not in (1, 2):
            raise ValueError(f"σReparam version must be 1 or 2, got {version}")
        self.n_power_iterations, self.eps, self.alpha = n_power_iterations, eps, alpha
        w = weight.detach().float()
        # Deterministic start (no global-RNG draw: wrapping must not shift the training seed).
        v = F.normalize(torch.ones(w.shape[1], device=w.device) + torch.arange(w.shape[1], device=w.device) * 1e-3,
                        dim=0, eps=eps)
        u = F.normalize(w @ v, dim=0, eps=eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        self.register_buffer("_sn_version", torch.tensor(version))
        self._version = version
        if not w.is_meta:  # a meta build (validate, plan) has no values to iterate on; on meta each op is slow
            self._power_iteration(w, INIT_POWER_ITERATIONS)
        sigma = self.sigma(weight.detach()).double() + eps  # tensor ops only: meta-device builds work
        init = sigma if version == 1 else _inverse_softplus((sigma - alpha).clamp_min(_MIN_INIT))
        # 2-D so that weight decay applies to it (see the module docstring).
        self.scale = nn.Parameter(init.float().reshape(1, 1))

    @property
    def version(self) -> int:
        return self._version

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The version is also a plain attribute: reading the buffer would sync (or fail on meta).
        key = f"{prefix}_sn_version"
        if key in state_dict:
            self._version = int(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def gain(self) -> Tensor:
        """The realised gain (0-d): the spectral norm of W_hat."""
        return gain(self.scale, self.version, self.alpha)

    @torch.no_grad()
    def _power_iteration(self, w: Tensor, steps: int) -> None:
        u, v = power_iteration(w, self._u, self._v, steps, self.eps)
        self._u.copy_(u)
        self._v.copy_(v)

    def sigma(self, weight: Tensor) -> Tensor:
        """σ(W) ≈ uᵀ W v with the current (detached) singular-vector estimates."""
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return torch.dot(u, torch.mv(weight.float(), v))

    def forward(self, weight: Tensor) -> Tensor:
        if self.training and not weight.is_meta:  # (the planner's meta forward: 2 matvecs, nothing to update)
            self._power_iteration(weight.detach().float(), self.n_power_iterations)
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return realise(weight, u, v, self.scale, self.version, self.eps, self.alpha)


class ChunkedSpectralReparam(nn.Module):
    """σReparam per block of rows: ``parts[i]`` reparametrises the i-th of ``num_chunks`` equal row
    blocks (q, k, v of a fused qkv projection) with its own σ and gain."""

    def __init__(self, weight: Tensor, num_chunks: int, **kwargs) -> None:
        super().__init__()
        if num_chunks < 1 or weight.shape[0] % num_chunks:
            raise ValueError(f"σReparam: cannot split {weight.shape[0]} rows into {num_chunks} equal parts")
        self.num_chunks = num_chunks
        self.parts = nn.ModuleList(SpectralReparam(p, **kwargs) for p in weight.split(weight.shape[0] // num_chunks))

    def forward(self, weight: Tensor) -> Tensor:
        chunks = weight.split(weight.shape[0] // self.num_chunks, dim=0)
        return torch.cat([part(chunk) for part, chunk in zip(self.parts, chunks)], dim=0)


_PARAMETRIZATIONS = (SpectralReparam, ChunkedSpectralReparam)


def fused_qkv_chunks(name: str, layer: nn.Module) -> int:  # noqa: ARG001 - chunks signature
    """3 for a fused q/k/v projection (a Linear named ``qkv``), else 1."""
    return 3 if name == "qkv" or name.endswith(".qkv") else 1


def is_linear(name: str, module: nn.Module) -> bool:  # noqa: ARG001 - filter signature
    return isinstance(module, nn.Linear)


def apply_spectral_reparam(module: nn.Module, filter: Optional[Callable[[str, nn.Module], bool]] = None,
                           n_power_iterations: int = 1, eps: float = 1e-6,
                           chunks: Callable[[str, nn.Module], int] = fused_qkv_chunks) -> list[str]:
    """Wrap every ``nn.Linear`` under ``module`` for which ``filter(name, layer)`` is true;
    ``chunks(name, layer)`` parts get their own σ and gain (default: 3 for ``qkv``, else 1).

    Returns the names of the wrapped layers. Layers already wrapped are left alone.
    """
    chosen = filter or is_linear
    wrapped = []
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, nn.Linear) or not chosen(name, layer):
            continue
        if parametrize.is_parametrized(layer, "weight"):
            continue
        n = chunks(name, layer)
        kwargs = dict(n_power_iterations=n_power_iterations, eps=eps)
        reparam = ChunkedSpectralReparam(layer.weight, n, **kwargs) if n > 1 else SpectralReparam(layer.weight, **kwargs)
        parametrize.register_parametrization(layer, "weight", reparam)
        wrapped.append(name)
    return wrapped


def has_spectral_reparam(module: nn.Module) -> bool:
    return any(isinstance(m, _PARAMETRIZATIONS) for m in module.modules())


def remove_spectral_reparam(module: nn.Module) -> int:
    """Bake W_hat into a plain ``weight`` (no power-iteration step is taken); returns the count."""
    count = 0
    for layer in list(module.modules()):
        plist = getattr(layer, "parametrizations", None)
        if plist is None or "weight" not in plist:
            continue
        if not any(isinstance(p, _PARAMETRIZATIONS) for p in plist["weight"]):
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
        if not any(isinstance(p, _PARAMETRIZATIONS) for p in chain):
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
