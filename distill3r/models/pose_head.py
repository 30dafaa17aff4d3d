"""Pose head: the global point map as a per-view similarity of the local point map.

A second DPT head (the published student's global head) must draw every pixel's point in view
0's frame, which means applying each view's rotation to its depth map inside a stack of
convolutions: a multiplicative interaction that a small head trained for minutes learns poorly.
This head instead predicts, per view, one similarity of view i's camera frame to view 0's
(as VGGT predicts a camera per frame and builds points from depth and camera) and composes

    ``xyz_global_i = s_i * R_i @ xyz_local_i + t_i``

so the global map is rigidly consistent with the local one by construction.

Inputs: the view's tokens of the last hooked decoder block ``[V, P, D]`` (they have attended to
every view). The tokens are mean-pooled and an MLP (``D -> D -> 10``) gives a 6-D rotation
(the first two columns, Gram-Schmidt orthonormalised: Zhou et al., "On the continuity of
rotation representations", CVPR 2019), a translation (in the local map's units) and a log
scale. The last layer starts at zero with the identity in its bias, so an untrained head maps
local to global unchanged. Reference views (view 0 of a sample) get the identity exactly: the
global frame is their camera frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_IDENTITY_6D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def rotation_from_6d(raw: torch.Tensor) -> torch.Tensor:
    """``[..., 6]`` (two 3-vectors) -> ``[..., 3, 3]`` rotation whose first two columns are the
    Gram-Schmidt orthonormalisation of the two vectors."""
    a1, a2 = raw[..., :3], raw[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


class PoseHead(nn.Module):
    """``[V, P, D]`` tokens -> ``R [V,3,3]``, ``t [V,3]``, ``scale [V]`` (float32)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 10))
        nn.init.zeros_(self.mlp[-1].weight)
        with torch.no_grad():
            self.mlp[-1].bias.copy_(torch.tensor(_IDENTITY_6D + (0.0,) * 4))

    def forward(self, tokens: torch.Tensor, reference: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``reference`` bool ``[V]``: views whose similarity is the identity."""
        raw = self.mlp(tokens.mean(dim=1)).float()
        rot = rotation_from_6d(raw[:, :6])
        trans, scale = raw[:, 6:9], raw[:, 9].clamp(-10.0, 10.0).exp()
        ref = reference.to(device=raw.device, dtype=torch.bool)
        eye = torch.eye(3, device=raw.device, dtype=rot.dtype).expand_as(rot)
        rot = torch.where(ref[:, None, None], eye, rot)
        trans = torch.where(ref[:, None], torch.zeros_like(trans), trans)
        scale = torch.where(ref, torch.ones_like(scale), scale)
        return rot, trans, scale

    @staticmethod
    def compose(xyz_local: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        """``xyz_local [V,H,W,3]`` -> ``s * R @ x + t`` ``[V,H,W,3]``."""
        out = torch.einsum("vij,vhwj->vhwi", rot, xyz_local)
        return out * scale[:, None, None, None] + trans[:, None, None, :]
