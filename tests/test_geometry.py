"""Geometry helpers on exact synthetic data."""

import numpy as np
import pytest

from distill3r import geometry as g


def _random_pose(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = rng.normal(size=3)
    return T


def test_backproject_then_project_is_identity():
    K = np.array([[50.0, 0, 20.0], [0, 55.0, 14.0], [0, 0, 1]])
    depth = np.random.default_rng(0).uniform(1, 3, size=(28, 42))
    pts = g.depth_to_camera_points(depth, K)
    assert np.array_equal(pts[..., 2], depth)
    u, v, z = g.project(pts, K)
    uu, vv = g.pixel_grid(28, 42)
    assert np.allclose(u, uu) and np.allclose(v, vv) and np.allclose(z, depth)


def test_invert_and_relative_poses():
    rng = np.random.default_rng(1)
    poses = np.stack([_random_pose(rng) for _ in range(3)])
    assert np.allclose(g.invert_pose(poses[0]) @ poses[0], np.eye(4))
    rel = g.relative_poses(poses)
    assert np.allclose(rel[0], np.eye(4))
    assert np.allclose(poses[0] @ rel[2], poses[2])


def test_umeyama_recovers_similarity_and_rejects_degenerate():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(100, 3))
    T = _random_pose(rng)
    dst = 2.5 * src @ T[:3, :3].T + T[:3, 3]
    s, R, t = g.umeyama(src, dst)
    assert s == pytest.approx(2.5)
    assert np.allclose(R, T[:3, :3]) and np.allclose(t, T[:3, 3])
    s1, _, _ = g.umeyama(src, dst, with_scale=False)
    assert s1 == 1.0
    with pytest.raises(ValueError, match="at least 3 points"):
        g.umeyama(src[:2], dst[:2])
