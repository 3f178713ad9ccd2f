"""Normalisation of teacher targets: per-channel standardisation and PHI-S.

Teachers' feature distributions differ wildly in scale (a SAM neck feature and a DFN CLIP
token are orders of magnitude apart), so their losses are not comparable. A target norm
estimates a teacher's feature statistics over a few batches, the student's adaptor learns the
*normalised* targets, and ``denormalize`` maps an adaptor output back into the teacher's true
feature space (for evaluation and export).

* ``Standardize``: per-channel ``(x - mean) / std``.
* ``PHIS``: PHI Standardization (Ranzinger et al. 2024, "PHI-S: Distribution Balancing for
  Label-Free Multi-Teacher Distillation"): ``x' = H U^T (x - mu) / sigma`` where ``U`` holds the
  eigenvectors of the covariance, ``H`` is a normalised Hadamard matrix and ``sigma`` is the
  square root of the mean eigenvalue. Every output dimension then has the *same* variance (1),
  with one scalar scale for all dimensions, so no channel is amplified (isotropic, invertible,
  robust to low-rank features, unlike full whitening).

Both share one API: ``update(rows)`` (any number of times; float64 sums), ``finalize()``,
``normalize_summary``, ``normalize_spatial``, ``denormalize`` and ``inverse_affine`` (the
de-normalisation as x = A y + c, which exports fold into each head's last linear layer). The finalized statistics are
persistent buffers, so they are saved in and restored from checkpoints; the running sums are
not (re-estimate after a resume that happens before ``finalize``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

TARGET_NORM_KINDS = ("none", "standardize", "phi_s")


class _TargetNorm(nn.Module):
    """Accumulates first and second moments of (N, C) feature rows in float64."""

    #: whether the second-moment accumulator is the full (C, C) matrix or per channel.
    full_covariance = False

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"{type(self).__name__}: dim must be positive, got {dim}")
        self.dim, self.eps = dim, eps
        self.register_buffer("ready", torch.tensor(False))
        self._ready_key: Optional[tuple[int, int]] = None  # the (buffer, version) last seen True
        self.register_buffer("mean", torch.zeros(dim))
        second = (dim, dim) if self.full_covariance else (dim,)
        self.register_buffer("_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_sum", torch.zeros(dim, dtype=torch.float64), persistent=False)
        self.register_buffer("_sum_sq", torch.zeros(second, dtype=torch.float64), persistent=False)

    # -- estimation ---------------------------------------------------------------------
    @torch.no_grad()
    def update(self, features: Tensor) -> None:
        """Accumulate statistics of feature rows (N, C)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__}.update expects rows (N, {self.dim}), "
                             f"got {tuple(features.shape)}")
        x = features.detach().to(device=self._sum.device, dtype=torch.float64)
        self._count += x.shape[0]
        self._sum += x.sum(0)
        self._sum_sq += x.T @ x if self.full_covariance else (x * x).sum(0)

    def update_spatial(self, features: Tensor) -> None:
        """Accumulate statistics of a (B, C, h, w) grid (every cell is a row)."""
        self.update(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))

    @torch.no_grad()
    def all_reduce_(self, group=None) -> None:
        """Sum the running statistics over the ranks of ``group`` (every rank that runs this
        teacher), before ``finalize``; a no-op without an initialised process group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self._count, self._sum, self._sum_sq):
                dist.all_reduce(t, group=group)

    def reset(self) -> None:
        """Forget the running sums (to re-estimate; the finalized buffers stay until then)."""
        for t in (self._count, self._sum, self._sum_sq):
            t.zero_()

    def _moments(self) -> tuple[Tensor, Tensor]:
        n = float(self._count)
        if n < 2:
            raise RuntimeError(f"{type(self).__name__}.finalize: need at least 2 feature rows, "
                               f"got {int(n)}; call update() with teacher features first")
        mean = self._sum / n
        if self.full_covariance:
            second = (self._sum_sq - n * torch.outer(mean, mean)) / (n - 1)
        else:
            second = (self._sum_sq - n * mean * mean) / (n - 1)
        return mean, second

    @torch.no_grad()
    def finalize(self) -> None:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    # -- application ----------------------------------------------------------------------
    def _check_ready(self) -> None:
        ready = self.ready
        if ready.is_meta:  # an architecture built without weights (dry runs)
            return
        # Read on the host once per value of the buffer (a write or a load bumps its version),
        # not on every training step: each read waits for the device.
        key = (id(ready), ready._version)
        if key == self._ready_key:
            return
        if not bool(ready):
            raise RuntimeError(f"{type(self).__name__}: statistics are not estimated yet; call "
                               "update() over a few batches of teacher features, then finalize()")
        self._ready_key = key

    def _forward_rows(self, x: Tensor) -> Tensor:  # pragma: no cover - subclass
        raise NotImplementedError

    def _inverse_rows(self, x: Tensor) -> Tensor:  # pragma: no cover - subclass
        raise NotImplementedError

    def normalize_summary(self, x: Tensor) -> Tensor:
        """(B, C) -> normalised (B, C) (any (..., C) with channels last works)."""
        self._check_ready()
        return self._forward_rows(x.float()).to(x.dtype)

    def normalize_spatial(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> normalised (B, C, h, w)."""
        self._check_ready()
        y = self._forward_rows(x.float().permute(0, 2, 3, 1))
        return y.permute(0, 3, 1, 2).to(x.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of the normalisation for channels-last input (..., C): maps an adaptor's
        output back into the teacher's true feature space."""
        self._check_ready()
        return self._inverse_rows(x.float()).to(x.dtype)

    def inverse_affine(self) -> tuple[Tensor, Tensor]:
        """``denormalize`` as an affine map in float64: ``(A, c)`` with x = A y + c, so that it
        can be folded into the last linear layer of an adaptor head (exports)."""
        self._check_ready()
        return self._inverse_affine()

    def _inverse_affine(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - subclass
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ready={bool(self.ready)}"


class Standardize(_TargetNorm):
    """Per-channel standardisation ``(x - mean) / std``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def finalize(self) -> None:
        mean, var = self._moments()
        self.mean.copy_(mean)
        self.std.copy_(var.clamp_min(0).add(self.eps).sqrt())
        self.ready.fill_(True)

    def _forward_rows(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def _inverse_rows(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean

    def _inverse_affine(self) -> tuple[Tensor, Tensor]:
        return torch.diag(self.std.double()), self.mean.double()


class PHIS(_TargetNorm):
    """PHI-S: ``x' = H U^T (x - mu) / sigma`` (see the module docstring).

    Buffers: ``mean`` (C,), ``rotation`` = ``H U^T`` (C, C, orthogonal), ``scale`` = sigma.
    Needs a Hadamard matrix of order C (exists for the dims teachers use: 256, 768, 1024,
    1152, 1280, 1536, ... ; see ``hadamard``).
    """

    full_covariance = True

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)
        # Fail at build time, not after statistics were gathered.
        self.register_buffer("hadamard", hadamard(dim), persistent=False)
        self.register_buffer("rotation", torch.eye(dim))
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def finalize(self) -> None:
        mean, cov = self._moments()
        eigvals, eigvecs = torch.linalg.eigh(cov)  # cov = U diag(l) U^T
        eigvals = eigvals.clamp_min(0)
        sigma = math.sqrt(float(eigvals.mean()) + self.eps)
        rotation = self.hadamard.to(torch.float64) @ eigvecs.T
        self.mean.copy_(mean)
        self.rotation.copy_(rotation)
        self.scale.fill_(sigma)
        self.ready.fill_(True)

    def _forward_rows(self, x: Tensor) -> Tensor:
        return (x - self.mean) @ self.rotation.T / self.scale

    def _inverse_rows(self, x: Tensor) -> Tensor:
        return (x * self.scale) @ self.rotation + self.mean

    def _inverse_affine(self) -> tuple[Tensor, Tensor]:
        return self.scale.double() * self.rotation.double().T, self.mean.double()


def build_target_norm(kind: str, dim: int, eps: float = 1e-6) -> Optional[_TargetNorm]:
    """``"none"`` -> None, ``"standardize"`` -> Standardize, ``"phi_s"`` -> PHIS."""
    if kind == "none":
        return None
    if kind == "standardize":
        return Standardize(dim, eps)
    if kind == "phi_s":
        return PHIS(dim, eps)
    raise ValueError(f"unknown target normalisation {kind!r}; expected one of {', '.join(TARGET_NORM_KINDS)}")


# --------------------------------------------------------------------------- Hadamard matrices


def hadamard(n: int) -> Tensor:
    """A normalised Hadamard matrix of order ``n`` (orthogonal, every entry +-1/sqrt(n)).

    Built from Sylvester doubling and the two Paley constructions over prime fields, which
    covers every power of two and orders such as 12 * 2^k, 20 * 2^k, 36 * 2^k (768, 1152,
    1280, 1536, ...). Raises ValueError for orders it cannot build.
    """
    h = _hadamard_pm1(n)
    if h is None:
        raise ValueError(f"PHI-S needs a Hadamard matrix of order {n}, which this module cannot "
                         "construct (orders are 1, 2 or multiples of 4 built by Sylvester/Paley); "
                         "use target normalisation 'standardize' for this teacher")
    return h.float() / math.sqrt(n)


def _hadamard_pm1(n: int) -> Optional[Tensor]:
    """A +-1 Hadamard matrix of order n, or None."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4:
        return None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley_1(n - 1)
    if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley_2(n // 2 - 1)
    half = _hadamard_pm1(n // 2)
    if half is not None:
        return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)
    return None


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = legendre(j - i mod q) for a prime q."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley_1(q: int) -> Tensor:
    """Paley construction I: order q + 1 for a prime q = 3 (mod 4)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley_2(q: int) -> Tensor:
    """Paley construction II: order 2(q + 1) for a prime q = 1 (mod 4)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0] = 1.0, 1.0
    c[1:, 1:] = _jacobsthal(q)
    off_diagonal = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    diagonal = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, off_diagonal) + torch.kron(torch.eye(q + 1, dtype=torch.float64), diagonal)


__all__ = ["Standardize", "PHIS", "build_target_norm", "hadamard", "TARGET_NORM_KINDS"]
