"""Intermediate-layer targets: the output of one block of a teacher, captured by a forward hook.

Not a plugin (no entry point): teacher plugins import it as ``radio_plugins._layer_taps``."""
from __future__ import annotations

from typing import Optional

from torch import nn


class LayerTap:
    """Captures the output of block ``index`` (1-based, as ``hidden_states[index]`` counts;
    negative counts from the end) of ``blocks`` during a forward: intermediate-layer targets."""

    def __init__(self, plugin: str, blocks: nn.ModuleList, index: Optional[int]) -> None:
        self.index = None
        if index is not None:
            n = len(blocks)
            i = index + n + 1 if index < 0 else index
            if not 1 <= i <= n:
                raise ValueError(f"{plugin} teacher: layer {index} is not a block of this {n}-block model "
                                 f"(1..{n}, or negative from the end)")
            self.index = i
        self._blocks, self._out = blocks, None

    def __enter__(self) -> "LayerTap":
        if self.index is not None:
            def hook(_module, _inputs, output):
                self._out = output[0] if isinstance(output, tuple) else output

            self._handle = self._blocks[self.index - 1].register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.index is not None:
            self._handle.remove()

    @property
    def output(self):
        return self._out
