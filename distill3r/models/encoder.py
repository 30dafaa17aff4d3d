"""Per-view ViT encoder (timm ``VisionTransformer``), shared across views.

For the ``paper`` config this is the ``vit_small_patch14_reg4_dinov2`` layout at 448 px
(32x32 learned position grid, 4 registers, ``no_embed_class``, LayerScale, qkv bias), so DUNE
weights load into ``Encoder.vit`` after :func:`distill3r.models.dune.dune_to_timm`. Inputs are
RGB in [0, 1]; ImageNet mean/std normalisation happens here. ``dynamic_img_size`` resamples the
position grid bicubically to any input grid.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from distill3r.models.configs import StudentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """``[V, 3, H, W]`` in [0, 1] -> normed patch tokens ``[V, (H/p)*(W/p), enc_dim]``
    (row-major over the patch grid; CLS and register tokens dropped)."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.vit = VisionTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0, global_pool="",
            fc_norm=False, embed_dim=cfg.enc_dim, depth=cfg.enc_depth, num_heads=cfg.enc_heads,
            mlp_ratio=cfg.enc_mlp_ratio, qkv_bias=True, init_values=cfg.enc_layerscale,
            class_token=cfg.enc_class_token, reg_tokens=cfg.enc_reg_tokens, no_embed_class=True,
            pos_embed=cfg.enc_pos_embed, dynamic_img_size=True,
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        tokens = self.vit.forward_features(x)
        return tokens[:, self.vit.num_prefix_tokens:]
