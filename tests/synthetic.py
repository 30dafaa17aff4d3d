"""Exact synthetic multi-view scenes (ray-cast boxes) for tests and sanity checks.

A scene is the inside of a box-shaped room with a few solid boxes standing in it, seen by
pinhole cameras near the room centre. Depth, intrinsics, poses and the exact point maps are
returned, so metrics and pose estimators can be checked against known answers.
"""

from __future__ import annotations

import numpy as np

from distill3r.geometry import invert_pose, pixel_grid, transform_points

ROOM = (np.array([-2.0, -1.5, -2.0]), np.array([2.0, 1.5, 3.0]))  # lo, hi corners (metres)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world rotation: yaw about y (down axis), pitch about x, roll about z."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return Ry @ Rx @ Rz


def _ray_depth(origin: np.ndarray, dirs: np.ndarray, boxes: list[tuple[np.ndarray, np.ndarray]]
               ) -> np.ndarray:
    """Ray parameter of the first hit: the room from inside, then solid ``boxes`` (slab test).

    ``dirs`` ``[M,3]`` are camera rays scaled so their camera-frame z is 1, hence the returned
    parameter ``[M]`` is the z-depth.
    """
    lo, hi = ROOM
    with np.errstate(divide="ignore", invalid="ignore"):
        t_room = np.where(dirs > 0, (hi - origin) / dirs, (lo - origin) / dirs)
        t_room = np.where(dirs == 0, np.inf, t_room).min(axis=1)
        t = t_room
        for blo, bhi in boxes:
            t1 = (blo - origin) / dirs
            t2 = (bhi - origin) / dirs
            tmin = np.nanmax(np.minimum(t1, t2), axis=1)
            tmax = np.nanmin(np.maximum(t1, t2), axis=1)
            hit = (tmax >= tmin) & (tmin > 1e-6)
            t = np.where(hit & (tmin < t), tmin, t)
    return t


def synthetic_scene(num_views: int = 4, height: int = 24, width: int = 32, seed: int = 0,
                    focal: float | None = None, num_boxes: int = 3) -> dict[str, np.ndarray]:
    """Render an exact scene.

    Returns a dict of float64 arrays: ``depth [N,H,W]`` (all valid), ``K [N,3,3]`` (shared),
    ``c2w [N,4,4]`` (room frame), ``xyz_local [N,H,W,3]`` (each camera's frame),
    ``xyz_global [N,H,W,3]`` (view 0's camera frame) and ``valid [N,H,W]`` bool.
    """
    rng = np.random.default_rng(seed)
    f = focal if focal is not None else 0.9 * max(height, width)
    K = np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1.0]])
    boxes = []
    for _ in range(num_boxes):
        centre = rng.uniform([-1.2, 0.3, 1.0], [1.2, 1.0, 2.4])
        half = rng.uniform(0.15, 0.45, size=3)
        half[1] = 1.5 - centre[1]  # stand on the floor (y down: floor at y = +1.5)
        boxes.append((centre - half, centre + half))
    u, v = pixel_grid(height, width)
    rays = np.stack([(u - K[0, 2]) / f, (v - K[1, 2]) / f, np.ones_like(u)], -1).reshape(-1, 3)
    c2w = np.tile(np.eye(4), (num_views, 1, 1))
    depth = np.zeros((num_views, height, width))
    for i in range(num_views):
        c2w[i, :3, :3] = _rotation(rng.uniform(-0.6, 0.6), rng.uniform(-0.25, 0.25),
                                   rng.uniform(-0.08, 0.08))
        c2w[i, :3, 3] = rng.uniform([-0.6, -0.3, -0.8], [0.6, 0.3, 0.2])
        dirs = rays @ c2w[i, :3, :3].T
        depth[i] = _ray_depth(c2w[i, :3, 3], dirs, boxes).reshape(height, width)
    xyz_local = np.zeros((num_views, height, width, 3))
    xyz_local[..., 0] = (u - K[0, 2]) / f * depth
    xyz_local[..., 1] = (v - K[1, 2]) / f * depth
    xyz_local[..., 2] = depth
    to_ref = invert_pose(c2w[0])[None] @ c2w
    xyz_global = np.stack([transform_points(T, p) for T, p in zip(to_ref, xyz_local)])
    return {"depth": depth, "K": np.tile(K, (num_views, 1, 1)), "c2w": c2w,
            "xyz_local": xyz_local, "xyz_global": xyz_global,
            "valid": np.isfinite(depth) & (depth > 0)}
