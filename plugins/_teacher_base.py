"""What teacher plugins share: the facts a teacher reports (``teacher_facts``), and the base class of
transformers ViT teachers whose output is ``[CLS, registers..., patches]`` (DINOv2, DINOv3).

Not a plugin (no entry point): teacher plugins import it as ``radio_plugins._teacher_base``."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radio_core import Teacher, TeacherOutput

from ._layer_taps import LayerTap


def teacher_facts(teacher: Teacher) -> dict:
    return {k: getattr(teacher, k) for k in
            ("input_size", "patch_size", "summary_dim", "spatial_dim", "mean", "std", "resize_mode")}


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClsTokenViTTeacher(Teacher):
    """A transformers ViT whose ``last_hidden_state`` is ``[CLS, registers..., patches]`` after a
    final norm (DINOv2, DINOv3): summary = CLS, spatial = the patch grid, optionally upsampled;
    ``layer`` taps an intermediate block instead (through the same final norm). Subclasses say
    where the blocks and the final norm are (``PLUGIN``, ``blocks``, ``final_norm``)."""

    PLUGIN = "vit"

    def __init__(self, model: nn.Module, input_size: tuple[int, int], num_registers: int,
                 upsample_to: Optional[tuple[int, int]] = None, layer: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        #: intermediate-layer target: block ``layer``'s tokens through the final norm
        self.layer = LayerTap(self.PLUGIN, self.blocks(), layer).index
        config = model.config
        self.num_registers = num_registers
        self.input_size = tuple(input_size)
        self.patch_size = int(config.patch_size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.summary_dim = self.spatial_dim = int(config.hidden_size)
        self.resize_mode = "resize"
        self.upsample_to = upsample_to

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def fingerprint(self) -> str:
        base = super().fingerprint()
        return base if self.layer is None else f"{base}-layer{self.layer}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        with LayerTap(self.PLUGIN, self.blocks(), self.layer) as tap:
            tokens = self.model(pixel_values=images).last_hidden_state
        if tap.index is not None:  # the tapped block's tokens, normalised like the final ones
            tokens = self.final_norm()(tap.output)
        b, _, height, width = images.shape
        h, w = height // self.patch_size, width // self.patch_size
        spatial = tokens[:, 1 + self.num_registers:].transpose(1, 2).reshape(b, -1, h, w)
        if self.upsample_to is not None and tuple(self.upsample_to) != (h, w):
            spatial = F.interpolate(spatial, size=self.upsample_to, mode="bilinear", align_corners=False)
        return TeacherOutput(summary=tokens[:, 0], spatial=spatial)


def grid_size(value: Optional[Union[int, Sequence[int]]]) -> Optional[tuple[int, int]]:
    """An ``upsample_to`` argument (one int or (h, w)) as (h, w)."""
    if value is None:
        return None
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)
