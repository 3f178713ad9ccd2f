"""Any timm Vision Transformer as a radio-distill teacher."""
from __future__ import annotations

from typing import Optional


from torch import Tensor

from radio_core import Teacher, TeacherOutput, hookimpl


class TimmViTTeacher(Teacher):
    def __init__(self, model: str, checkpoint: Optional[str] = None, resolution: Optional[tuple[int, int]] = None,
                 **model_kwargs) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(model, pretrained=False, checkpoint_path=checkpoint or "", num_classes=0,
                                       **model_kwargs)
        if resolution is not None:
            # Load at the native size, then resample the position embedding to the new grid.
            self.model.set_input_size(img_size=tuple(resolution))
        cfg = self.model.pretrained_cfg
        self.input_size = tuple(self.model.patch_embed.img_size)
        self.patch_size = self.model.patch_embed.patch_size[0]
        self.mean, self.std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.summary_dim = self.spatial_dim = self.model.embed_dim

    def forward(self, images: Tensor) -> TeacherOutput:
        tokens = self.model.forward_features(images)  # (B, prefix + h*w, D), after the final norm
        prefix = self.model.num_prefix_tokens
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patches = tokens[:, prefix:]
        spatial = patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)
        return TeacherOutput(summary=tokens[:, 0], spatial=spatial)


def build_timm_vit(model: str, checkpoint: Optional[str] = None, resolution: Optional[tuple[int, int]] = None,
                   **model_kwargs) -> TimmViTTeacher:
    """Any timm ViT (class token + patch tokens) as a teacher; weights from a local file."""
    return TimmViTTeacher(model, checkpoint, resolution, **model_kwargs)


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "timm_vit", build_timm_vit)


__all__ = ["TimmViTTeacher", "build_timm_vit"]
