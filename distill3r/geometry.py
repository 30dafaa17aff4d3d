"""Pure geometry on numpy arrays (float64 where precision matters).

Conventions: OpenCV cameras (x right, y down, z forward); poses are camera-to-world 4x4
``c2w``; intrinsics ``K`` 3x3 in pixels, pixel centres at integer coordinates; point maps are
views-first ``[N,H,W,3]``.
"""

from __future__ import annotations

import numpy as np

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenGL camera axes (y up, z back) <-> OpenCV



def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(u, v)`` each ``[H,W]`` float64, u along width."""
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                       indexing="ij")
    return u, v


def depth_to_camera_points(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Back-project z-depth ``[H,W]`` with intrinsics ``K`` [3,3] to camera points ``[H,W,3]``.

    The result has ``z == depth`` exactly (invalid depth stays whatever it was, e.g. 0).
    """
    depth = np.asarray(depth, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    u, v = pixel_grid(*depth.shape)
    x = (u - K[0, 2]) / K[0, 0] * depth
    y = (v - K[1, 2]) / K[1, 1] * depth
    return np.stack([x, y, depth], axis=-1)


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid/similarity transform to points ``[...,3]``."""
    T = np.asarray(T, dtype=np.float64)
    return points @ T[:3, :3].T + T[:3, 3]


def invert_pose(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform (``[...,4,4]`` supported)."""
    T = np.asarray(T, dtype=np.float64)
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    out = np.zeros_like(T)
    Rt = np.swapaxes(R, -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def relative_poses(c2w: np.ndarray, ref: int = 0) -> np.ndarray:
    """Poses ``[N,4,4]`` re-expressed in view ``ref``'s camera frame (``ref`` becomes identity)."""
    c2w = np.asarray(c2w, dtype=np.float64)
    return invert_pose(c2w[ref])[None] @ c2w


def project(points_cam: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project camera points ``[...,3]`` to pixels: returns ``(u, v, z)``."""
    K = np.asarray(K, dtype=np.float64)
    z = points_cam[..., 2]
    safe = np.where(np.abs(z) > 1e-12, z, 1e-12)
    u = K[0, 0] * points_cam[..., 0] / safe + K[0, 2]
    v = K[1, 1] * points_cam[..., 1] / safe + K[1, 2]
    return u, v, z


def umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None,
            with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted similarity ``dst ~ s * R @ src + t`` (Umeyama 1991).

    Args:
        src, dst: ``[M,3]`` corresponding points.
        weights: ``[M]`` non-negative weights (default uniform).
        with_scale: fit the scale (sim(3)) or fix it to 1 (SE(3)).
    Returns:
        ``(s, R [3,3], t [3])``. Raises ``ValueError`` with fewer than 3 points or zero weight.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    if src.shape != dst.shape:
        raise ValueError(f"umeyama: shapes differ {src.shape} vs {dst.shape}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if len(src) < 3 or w.sum() <= 0:
        raise ValueError("umeyama: need at least 3 points with positive total weight")
    w = w / w.sum()
    mu_s = w @ src
    mu_d = w @ dst
    xs = src - mu_s
    xd = dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1.0
    R = U @ S @ Vt
    var_s = (w * (xs * xs).sum(1)).sum()
    s = float((D * np.diag(S)).sum() / var_s) if with_scale and var_s > 0 else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def similarity_matrix(s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 matrix of ``x -> s R x + t``."""
    T = np.eye(4)
    T[:3, :3] = s * np.asarray(R)
    T[:3, 3] = t
    return T


def look_at(eye: np.ndarray, target: np.ndarray, down=(0.0, 1.0, 0.0), roll: float = 0.0
            ) -> np.ndarray:
    """OpenCV c2w ``[4,4]`` at ``eye`` looking at ``target``, image y as close to the world
    direction ``down`` as the view allows, then rolled by ``roll`` radians about the view axis.
    A ``target`` at ``eye`` looks along world z; a view along ``down`` takes x = world x."""
    z = np.asarray(target, np.float64) - np.asarray(eye, np.float64)
    z = z / np.linalg.norm(z) if np.linalg.norm(z) > 1e-12 else np.array([0.0, 0.0, 1.0])
    x = np.cross(np.asarray(down, np.float64), z)
    if np.linalg.norm(x) < 1e-9:
        x = np.array([1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c, s = np.cos(roll), np.sin(roll)
    x, y = c * x + s * y, -s * x + c * y
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w
