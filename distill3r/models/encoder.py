"""Per-view ViT encoder (timm ``VisionTransformer``), shared across views.

For the ``paper`` config this is the ``vit_small_patch14_reg4_dinov2`` layout at 448 px
(32x32 learned position grid, 4 registers, ``no_embed_class``, LayerScale, qkv bias), so DUNE
weights load into ``Encoder.vit`` after :func:`distill3r.models.dune.dune_to_timm`. Inputs are
RGB in [0, 1]; ImageNet mean/std normalisation happens here. The blocks' attention kernel
follows :func:`distill3r.models.attention.use_plain` (timm's plain path for short sequences on
the CPU, its fused SDPA call otherwise).

Position table resizing follows DUNE exactly (it uses DINOv2's ``interpolate_pos_encoding``,
facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``, with ``interpolate_offset=0.1``
and ``interpolate_antialias=False``): for a patch grid ``(h, w)`` different from the table's
``(M, M)``, ``F.interpolate(table, scale_factor=((h + 0.1) / M, (w + 0.1) / M),
mode="bicubic", antialias=False)`` computed in float32; the table is used as it is when the grid
equals it. timm's own ``dynamic_img_size`` resampling (bicubic to the target size, with
antialiasing) gives different numbers, so it is replaced here (:func:`resize_pos_table`).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from distill3r.models.attention import use_plain
from distill3r.models.configs import StudentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATE_OFFSET = 0.1


def resize_pos_table(table: torch.Tensor, table_hw: tuple[int, int],
                     grid_hw: tuple[int, int]) -> torch.Tensor:
    """Patch position table ``[1, M0*M1, C]`` (row-major ``(M0, M1)`` grid) resized to
    ``grid_hw=(h, w)`` the DUNE/DINOv2 way (see the module docstring) -> ``[1, h*w, C]`` in the
    table's dtype. Returns ``table`` itself when the grid equals the table's."""
    (m0, m1), (h, w) = table_hw, grid_hw
    if (h, w) == (m0, m1):
        return table
    c = table.shape[-1]
    grid = table.float().reshape(1, m0, m1, c).permute(0, 3, 1, 2)
    out = F.interpolate(grid, scale_factor=((h + INTERPOLATE_OFFSET) / m0,
                                            (w + INTERPOLATE_OFFSET) / m1),
                        mode="bicubic", antialias=False)
    assert out.shape[-2:] == (h, w), (out.shape, h, w)
    return out.permute(0, 2, 3, 1).reshape(1, h * w, c).to(table.dtype)


class ConvStemEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose projection is a small convolutional stem instead of one
    ``p x p`` stride-``p`` conv: 3x3 stride-2 conv ``3 -> stem_dim``, GELU, 3x3 conv
    ``stem_dim -> stem_dim``, GELU, ``p/2 x p/2`` stride-``p/2`` conv ``stem_dim -> embed_dim``.
    Same token grid ``(H/p, W/p)`` and output format as ``PatchEmbed`` (``p`` must be even);
    its parameters live under ``proj.0``, ``proj.2`` and ``proj.4``."""

    def __init__(self, *args, stem_dim: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p0, p1 = self.patch_size
        if p0 % 2 or p1 % 2:
            raise ValueError(f"ConvStemEmbed needs an even patch size, got {self.patch_size}")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(stem_dim, stem_dim, 3, padding=1), nn.GELU(),
            nn.Conv2d(stem_dim, embed_dim, (p0 // 2, p1 // 2), stride=(p0 // 2, p1 // 2)))


class DuneViT(VisionTransformer):
    """timm ``VisionTransformer`` (same parameters and state-dict keys) whose learned position
    table is resized with :func:`resize_pos_table` for every input grid."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # dynamic_img_size makes the patch embedding return [B, h, w, C]
        if self.pos_embed is None or not self.no_embed_class:
            return super()._pos_embed(x)
        b, h, w, c = x.shape
        pos = resize_pos_table(self.pos_embed, tuple(self.patch_embed.grid_size), (h, w))
        x = x.reshape(b, h * w, c) + pos
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        return self.pos_drop(x)


class Encoder(nn.Module):
    """``[V, 3, H, W]`` in [0, 1] -> normed patch tokens ``[V, (H/p)*(W/p), enc_dim]``
    (row-major over the patch grid; CLS and register tokens dropped)."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        embed = (partial(ConvStemEmbed, stem_dim=cfg.enc_stem_dim) if cfg.enc_stem_dim
                 else PatchEmbed)
        self.vit = DuneViT(
            img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0, global_pool="",
            fc_norm=False, embed_dim=cfg.enc_dim, depth=cfg.enc_depth, num_heads=cfg.enc_heads,
            mlp_ratio=cfg.enc_mlp_ratio, qkv_bias=True, init_values=cfg.enc_layerscale,
            class_token=cfg.enc_class_token, reg_tokens=cfg.enc_reg_tokens, no_embed_class=True,
            pos_embed=cfg.enc_pos_embed, dynamic_img_size=True, embed_layer=embed,
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        keys = (images.shape[-2] // p) * (images.shape[-1] // p) + self.vit.num_prefix_tokens
        fused = not use_plain(images.device, keys)
        for block in self.vit.blocks:  # timm's Attention reads the flag at every call
            block.attn.fused_attn = fused
        # channels-last: oneDNN and cuDNN run bf16 convolutions fastest on NHWC, and the layout
        # then carries through the patch embedding (a training step of tiny-pyramid-local on
        # the CPU: 7% faster)
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        tokens = self.vit.forward_features(x)
        return tokens[:, self.vit.num_prefix_tokens:]
