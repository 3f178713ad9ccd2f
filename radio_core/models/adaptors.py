"""Adaptor heads: map student tokens into each teacher's feature space."""
from __future__ import annotations

from torch import Tensor, nn

from ..protocols import Adaptor


class MLPAdaptor(Adaptor):
    """AM-RADIO's head: Linear(in -> hidden) -> LayerNorm -> GELU -> Linear(hidden -> out).

    With ``num_inner > 0`` it becomes RADIO's "MLP v2": residual blocks
    ``x + Linear(GELU(LN(x)))`` between the input projection and a final LN -> GELU -> Linear.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, num_inner: int = 0,
                 activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ("gelu", "relu"):
            raise ValueError(f"adaptor activation must be 'gelu' or 'relu', got {activation!r}")
        act = nn.GELU if activation == "gelu" else nn.ReLU
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_dim), act(), nn.Linear(hidden_dim, hidden_dim))
            for _ in range(num_inner))
        self.final = nn.Sequential(nn.LayerNorm(hidden_dim), act(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


class LinearAdaptor(Adaptor):
    """A single Linear layer (an ablation baseline)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def build_mlp(in_dim: int, out_dim: int, hidden_dim: int, num_inner: int = 0,
              activation: str = "gelu") -> MLPAdaptor:
    """2-layer MLP head (Linear, LayerNorm, GELU, Linear); num_inner>0 gives RADIO's MLP v2.

    num_inner: residual (LayerNorm, GELU, Linear) blocks between the two layers. activation:
    gelu or relu.
    """
    return MLPAdaptor(in_dim, out_dim, hidden_dim, num_inner=num_inner, activation=activation)


def build_linear(in_dim: int, out_dim: int, hidden_dim: int | None = None) -> LinearAdaptor:
    """Single linear projection (ablation baseline)."""
    return LinearAdaptor(in_dim, out_dim)
