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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StrideTwoConv(nn.Conv2d):
    """3x3 stride-2 conv (padding 1). oneDNN 3.12 (torch 2.14 CPU) returns garbage, sometimes
    NaN, for bf16 stride-2 convolutions whose output is one column wide; those (tiny) maps run
    in float32 instead."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_precision = x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type)
        if x.shape[-1] > 2 or not low_precision:
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.conv2d(x.float(), self.weight.float(), self.bias.float(), stride=2, padding=1)
        return out.to(x.dtype)


class ResidualConvUnit(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in-place where autograd allows: the heads run at full resolution, memory dominates
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out, inplace=True))
        return out.add_(x)


class FusionBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.rcu1 = ResidualConvUnit(dim)
        self.rcu2 = ResidualConvUnit(dim)
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
                 last_dim: int, out_channels: int = 4) -> None:
        super().__init__()
        assert len(in_dims) == 4 and len(layer_dims) == 4
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
        self.fusion = nn.ModuleList(FusionBlock(feature_dim) for _ in range(4))  # 0 = finest
        self.out_conv1 = nn.Conv2d(feature_dim, last_dim, 3, padding=1)
        self.out_conv2 = nn.Conv2d(last_dim, last_dim, 3, padding=1)
        self.out_conv3 = nn.Conv2d(last_dim, out_channels, 1)

    def forward(self, tokens: list[torch.Tensor], grid: tuple[int, int],
                size: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        levels = []
        for x, project, resample, rn in zip(tokens, self.project, self.resample, self.layer_rn):
            v, p, c = x.shape
            assert p == h * w, (p, grid)
            x = x.transpose(1, 2).reshape(v, c, h, w)
            levels.append(rn(resample(project(x))))
        path = None
        for k in (3, 2, 1, 0):
            if k > 0:
                target = levels[k - 1].shape[-2:]
            else:
                target = (2 * levels[0].shape[-2], 2 * levels[0].shape[-1])
            path = self.fusion[k](levels[k], path, tuple(target))
        out = F.interpolate(self.out_conv1(path), size=size, mode="bilinear", align_corners=True)
        del path
        out = F.relu(self.out_conv2(out), inplace=True)
        return self.out_conv3(out)
