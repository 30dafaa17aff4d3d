"""DPT head (Ranftl et al.): four token maps -> a dense full-resolution map.

For token grids of size ``(h, w)`` (stride ``patch_size`` in the image):
1. each hooked token map ``[V, h*w, C_i]`` -> ``[V, C_i, h, w]`` -> 1x1 conv to ``layer_dims[i]``;
2. resample by x4 (transposed conv k4 s4), x2 (transposed conv k2 s2), x1, x1/2 (3x3 conv s2,
   :class:`StrideTwoConv`),
   giving grids 4h, 2h, h, ceil(h/2);
3. 3x3 conv (no bias) of each to ``feature_dim``;
4. four fusion blocks from coarse to fine; block k adds ``rcu1(level_k)`` to the path coming
   from the coarser block (none for the coarsest, so every parameter is used), applies ``rcu2``,
   upsamples bilinearly to the next finer level's size (x2 after the finest) and applies a 1x1
   conv; each residual conv unit is ``x + conv(relu(conv(relu(x))))`` with 3x3 convs;
5. 3x3 conv ``feature_dim -> last_dim``, bilinear resize to exactly ``(H, W)`` (a factor of
   ``patch_size / 8``), 3x3 conv, ReLU, 1x1 conv to ``out_channels``.
Any ``H, W`` multiple of the patch size works (odd grids included).

With ``image_dim = d > 0`` the head also sees the image (a skip connection from the pixels, for
students whose encoder starts from random weights and draws every object from a coarse token
grid): the view ``[V,3,H,W]`` in [0, 1], shifted by -0.5 and resized (bilinear, antialiased) to
the finest fusion size ``(8h, 8w)``, goes through a 3x3 conv ``3 -> d`` + ReLU (at ``8h x 8w``)
and a 3x3 stride-2 conv ``d -> 2d`` + ReLU (at ``4h x 4w``); 1x1 convs project them to
``feature_dim`` and add them to the finest level (``4h x 4w``, before fusion) and to the path
after the finest fusion block (``8h x 8w``). The two projections start at zero, so an untrained
image branch leaves the head's output unchanged.

With ``image_blocks = b > 0`` the image branch is a small convolutional pyramid instead (the
role of the ResNet stages of DPT-Hybrid): four stages of widths ``d, 2d, 4d, 8d`` at ``8h, 4h,
2h, h`` (a 3x3 conv ``3 -> d``, then 3x3 stride-2 convs between stages), each followed by ``b``
residual conv units, so the receptive field grows to whole objects. Zero-initialised 1x1
projections add the four stages to the path after the finest fusion block and to levels 0, 1
and 2 (``4h, 2h, h``).

With ``image_full = f > 0`` (and an image branch) the head also sees the pixels at the output
size: the view at ``(H, W)`` goes through two 3x3 convs ``3 -> f -> f`` (ReLU after each) and a
zero-initialised 1x1 projection to ``last_dim``, added to the output stage after its bilinear
resize, before the 3x3 conv at ``(H, W)``. The fusion path ends at ``8h x 8w``, which is
``8 / patch_size`` of the image (0.57x for 14-pixel patches): without this branch the output
stage's only full-resolution input is a bilinear upsampling, and depth edges blur over the
resize (on the demo the pixels within one of a depth edge carry 1.7x the mean depth error).
Trained on the demo it made depth and normals worse, not edges sharper (``tiny-pyramid-full``).

Without autograd (validation, evaluation, inference, a checkpoint teacher) the output stage's two
convs at ``(H, W)`` run in float32 under any autocast, as VGGT runs its heads with autocast off
(facebookresearch/vggt ``vggt/models/vggt.py``, ``VGGT.forward``). bf16 keeps 8 significant
bits: it rounds the raw outputs by up to 0.4%, and the exp activation passes that on to the
points' depths, while neighbouring pixels' points at 112x112 (about a 60-degree view) lie only
about 1% of the depth apart, so normals taken from neighbours come out noisy (the demo student:
normal consistency 0.758 with the bf16 output stage, 0.765 with it in float32, depth unchanged).
Training keeps bf16 there: the loss takes the rounding as per-pixel noise, and float32 would
cost 12% of a CPU training step.

With ``norm`` every residual conv unit (fusion blocks and image pyramid) normalises before each
ReLU (GroupNorm, 4 channels per group, at most 8 groups; per view, so chunked and batched head
calls agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_fp32(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` in float32 whatever the dtypes of ``x`` and of the weights, and with any
    autocast switched off for it."""
    bias = None if conv.bias is None else conv.bias.float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding)


class StrideTwoConv(nn.Conv2d):
    """3x3 stride-2 conv (padding 1), ``dim -> out_dim`` (default ``dim``). oneDNN 3.12 (torch
    2.14 CPU) returns garbage, sometimes NaN, for bf16 stride-2 convolutions whose output is one
    column wide; those (tiny) maps run in float32 instead."""

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__(dim, out_dim or dim, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_precision = x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type)
        if x.shape[-1] > 2 or not low_precision:
            return super().forward(x)
        return _conv_fp32(self, x).to(x.dtype)


def norm_groups(dim: int) -> int:
    """Groups of the residual conv units' GroupNorm: 4 channels each up to 8 groups."""
    return max(1, min(8, dim // 4))


class ResidualConvUnit(nn.Module):
    """``x + conv(relu(conv(relu(x))))`` (3x3 convs); with ``norm`` a GroupNorm
    (:func:`norm_groups`) before each ReLU: ``x + conv(relu(gn(conv(relu(gn(x))))))``."""

    def __init__(self, dim: int, norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.GroupNorm(norm_groups(dim), dim) if norm else None
        self.norm2 = nn.GroupNorm(norm_groups(dim), dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in-place where autograd allows (never on x, the residual): the heads run at full
        # resolution, memory dominates
        out = self.conv1(F.relu(x) if self.norm1 is None else F.relu(self.norm1(x), inplace=True))
        if self.norm2 is not None:
            out = self.norm2(out)
        out = self.conv2(F.relu(out, inplace=True))
        return out.add_(x)


class FusionBlock(nn.Module):
    def __init__(self, dim: int, norm: bool = False) -> None:
        super().__init__()
        self.rcu1 = ResidualConvUnit(dim, norm)
        self.rcu2 = ResidualConvUnit(dim, norm)
        self.out_conv = nn.Conv2d(dim, dim, 1)

    def forward(self, level: torch.Tensor, path: torch.Tensor | None,
                size: tuple[int, int]) -> torch.Tensor:
        x = self.rcu1(level)
        if path is not None:
            x = x.add_(path)
        x = self.rcu2(x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """``[V, h*w, C_i]`` x 4 -> ``[V, out_channels, H, W]`` (raw, before activations)."""

    def __init__(self, in_dims: list[int], layer_dims: list[int], feature_dim: int,
                 last_dim: int, out_channels: int = 4, image_dim: int = 0,
                 image_blocks: int = 0, image_full: int = 0, norm: bool = False) -> None:
        super().__init__()
        assert len(in_dims) == 4 and len(layer_dims) == 4
        self.image_dim = image_dim
        self.image_blocks = image_blocks if image_dim else 0
        self.image_full = image_full if image_dim else 0
        if image_dim:
            d = image_dim
            self.image_conv1 = nn.Conv2d(3, d, 3, padding=1)
            self.image_conv2 = nn.Conv2d(d, 2 * d, 3, stride=2, padding=1)
            self.image_to_level = nn.Conv2d(2 * d, feature_dim, 1)
            self.image_to_path = nn.Conv2d(d, feature_dim, 1)
            if self.image_blocks:
                self.image_units = nn.ModuleList(
                    nn.Sequential(*(ResidualConvUnit(d << k, norm)
                                    for _ in range(self.image_blocks)))
                    for k in range(4))
                self.image_down = nn.ModuleList(
                    StrideTwoConv(d << k, d << (k + 1)) for k in (1, 2))
                self.image_to_coarse = nn.ModuleList(
                    nn.Conv2d(d << k, feature_dim, 1) for k in (2, 3))
            if self.image_full:
                f = self.image_full
                self.full_conv1 = nn.Conv2d(3, f, 3, padding=1)
                self.full_conv2 = nn.Conv2d(f, f, 3, padding=1)
                self.full_to_out = nn.Conv2d(f, last_dim, 1)
            for conv in self.image_projections():
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.project = nn.ModuleList(nn.Conv2d(c, d, 1) for c, d in zip(in_dims, layer_dims))
        d0, d1, _, d3 = layer_dims
        self.resample = nn.ModuleList([
            nn.ConvTranspose2d(d0, d0, kernel_size=4, stride=4),
            nn.ConvTranspose2d(d1, d1, kernel_size=2, stride=2),
            nn.Identity(),
            StrideTwoConv(d3),
        ])
        self.layer_rn = nn.ModuleList(
            nn.Conv2d(d, feature_dim, 3, padding=1, bias=False) for d in layer_dims)
        self.fusion = nn.ModuleList(FusionBlock(feature_dim, norm) for _ in range(4))  # 0 = finest
        self.out_conv1 = nn.Conv2d(feature_dim, last_dim, 3, padding=1)
        self.out_conv2 = nn.Conv2d(last_dim, last_dim, 3, padding=1)
        self.out_conv3 = nn.Conv2d(last_dim, out_channels, 1)

    def forward(self, tokens: list[torch.Tensor], grid: tuple[int, int],
                size: tuple[int, int], images: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` ``[V,3,H,W]`` in [0, 1]: required when the head has an image branch,
        ignored otherwise."""
        h, w = grid
        skips = self._image_features(images, grid) if self.image_dim else None
        levels = []
        for x, project, resample, rn in zip(tokens, self.project, self.resample, self.layer_rn):
            v, p, c = x.shape
            assert p == h * w, (p, grid)
            # channels-last, as oneDNN and cuDNN run bf16 convolutions fastest (a view for the
            # decoder's tokens, a copy for the encoder's, which sit behind its prefix tokens)
            x = x.transpose(1, 2).reshape(v, c, h, w).contiguous(memory_format=torch.channels_last)
            levels.append(rn(resample(project(x))))
        if skips is not None:
            for k, skip in enumerate(skips[1:]):
                levels[k] = levels[k] + skip
        path = None
        for k in (3, 2, 1, 0):
            if k > 0:
                target = levels[k - 1].shape[-2:]
            else:
                target = (2 * levels[0].shape[-2], 2 * levels[0].shape[-1])
            path = self.fusion[k](levels[k], path, tuple(target))
        if skips is not None:
            path = path + skips[0]
        out = F.interpolate(self.out_conv1(path), size=size, mode="bilinear", align_corners=True)
        del path
        if self.image_full:
            out = out + self._full_features(images, size)
        if torch.is_grad_enabled():
            out = F.relu(self.out_conv2(out), inplace=True)
            return self.out_conv3(out)
        out = F.relu(_conv_fp32(self.out_conv2, out), inplace=True)
        return _conv_fp32(self.out_conv3, out)

    def image_projections(self) -> list[nn.Conv2d]:
        """The image branch's zero-initialised 1x1 projections, in the order of
        :meth:`_image_features`' additions (path, level 0, then levels 1 and 2 with
        ``image_blocks``), then the full-resolution one with ``image_full``; empty without an
        image branch."""
        if not self.image_dim:
            return []
        coarse = list(self.image_to_coarse) if self.image_blocks else []
        full = [self.full_to_out] if self.image_full else []
        return [self.image_to_path, self.image_to_level, *coarse, *full]

    def _full_features(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The full-resolution branch's addition ``[V, last_dim, H, W]`` (``image_full``)."""
        x = images - 0.5
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = F.relu(self.full_conv1(x.contiguous(memory_format=torch.channels_last)))
        return self.full_to_out(F.relu(self.full_conv2(x), inplace=True))

    def _image_features(self, images: torch.Tensor | None, grid: tuple[int, int]
                        ) -> list[torch.Tensor]:
        """The image branch's additions ``[V,F,.,.]``: to the path after the finest fusion block
        (``8h x 8w``), then to levels 0 (``4h x 4w``) and, with ``image_blocks``, 1 and 2."""
        h, w = grid
        if images is None or images.ndim != 4 or images.shape[1] != 3:
            got = None if images is None else tuple(images.shape)
            raise ValueError(f"this DPT head has an image branch: it needs the views' images "
                             f"[V, 3, H, W], got {got}")
        x = F.interpolate(images - 0.5, size=(8 * h, 8 * w), mode="bilinear",
                          align_corners=False, antialias=True)
        # channels-last like the token levels (``forward``)
        x = x.contiguous(memory_format=torch.channels_last)
        fine = F.relu(self.image_conv1(x))
        projections = self.image_projections()
        if not self.image_blocks:
            stages = [fine, F.relu(self.image_conv2(fine))]
            return [project(x) for project, x in zip(projections[:2], stages)]
        fine = self.image_units[0](fine)
        stages = [fine, self.image_units[1](self.image_conv2(F.relu(fine)))]
        for down, units in zip(self.image_down, self.image_units[2:]):
            stages.append(units(down(F.relu(stages[-1]))))
        return [project(F.relu(x)) for project, x in zip(projections[:4], stages)]
