"""Ground-truth teacher: exact point maps from depth, intrinsics and poses.

- local points: depth back-projected with each view's K (``z == depth`` exactly);
- global points: view j's local points mapped by ``inv(c2w_0) @ c2w_j`` into view 0's frame;
- confidence (same for global and local): ``max_confidence`` on valid pixels,
  ``edge_confidence`` where the depth jumps by more than ``edge_threshold`` (relative) to any
  3x3 neighbour or a neighbour is invalid, and 1 on invalid pixels; mask = valid depth.
Deterministic and cheap; runs anywhere.
"""

from __future__ import annotations

import numpy as np

from distill3r.config import TeacherParams, to_dict
from distill3r.geometry import depth_to_camera_points, invert_pose, transform_points
from distill3r.teachers.base import Teacher, TeacherInput, TeacherOutput, params_digest

VERSION = 1  # bump when the outputs change for the same params


def depth_edges(depth: np.ndarray, threshold: float) -> np.ndarray:
    """Bool ``[H,W]``: valid pixels with a relative depth jump > ``threshold`` to a 3x3
    neighbour, or with an invalid neighbour. Image borders replicate (are not edges)."""
    valid = depth > 0
    padded = np.pad(depth, 1, mode="edge")
    h, w = depth.shape
    safe = np.where(valid, depth, 1.0)
    edges = np.zeros_like(valid)
    for dy in range(3):
        for dx in range(3):
            if dy == 1 and dx == 1:
                continue
            nb = padded[dy:dy + h, dx:dx + w]
            edges |= (nb <= 0) | (np.abs(nb - depth) / safe > threshold)
    return edges & valid


class GroundTruthTeacher(Teacher):
    """Point maps from ground-truth depth + K + c2w (see module docstring)."""

    name = "groundtruth"
    requires = ("depth", "K", "c2w")

    def __init__(self, params: TeacherParams):
        if not 1.0 <= params.edge_confidence <= params.max_confidence:
            raise ValueError("teacher: need 1 <= edge_confidence <= max_confidence, got "
                             f"{params.edge_confidence} and {params.max_confidence}")
        if params.edge_threshold <= 0:
            raise ValueError(f"teacher.edge_threshold must be > 0, got {params.edge_threshold}")
        self.params = params

    def _relevant(self) -> dict:
        p = self.params
        return {"edge_threshold": p.edge_threshold, "edge_confidence": p.edge_confidence,
                "max_confidence": p.max_confidence}

    def fingerprint(self) -> str:
        return f"{self.name}-v{VERSION}-{params_digest(self._relevant())}"

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint(), "version": VERSION,
                "params": to_dict(self.params)}

    def predict(self, batch: TeacherInput) -> TeacherOutput:
        where = f"groundtruth teacher, sample {batch.key!r}"
        if batch.depth is None or batch.K is None or batch.c2w is None:
            raise ValueError(f"{where}: needs depth, K and c2w for every view (the manifest "
                             "rows of this scene lack some of them)")
        n, (h, w) = batch.num_views, batch.size
        p = self.params
        w2c0 = invert_pose(batch.c2w[0])
        xyz_local = np.zeros((n, h, w, 3), np.float32)
        xyz_global = np.zeros((n, h, w, 3), np.float32)
        conf = np.ones((n, h, w), np.float32)
        mask = batch.depth > 0
        for j in range(n):
            depth = batch.depth[j].astype(np.float64)
            pts = depth_to_camera_points(depth, batch.K[j])
            glob = transform_points(w2c0 @ batch.c2w[j], pts)
            valid = mask[j]
            xyz_local[j][valid] = pts[valid]
            xyz_global[j][valid] = glob[valid]
            conf[j][valid] = p.max_confidence
            conf[j][depth_edges(batch.depth[j], p.edge_threshold)] = p.edge_confidence
        return TeacherOutput(xyz_global=xyz_global, xyz_local=xyz_local, conf_global=conf,
                             conf_local=conf.copy(), mask=mask)
