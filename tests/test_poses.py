"""Pose estimation from point maps (PnP and Procrustes) and pose metrics."""

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from distill3r.evaluation import (estimate_focal, intrinsics, pnp_poses, pose_metrics,
                                  procrustes_poses, relative_pose_errors)
from synthetic import synthetic_scene


def _pose(rot_deg=(0, 0, 0), t=(0, 0, 0)):
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("xyz", rot_deg, degrees=True).as_matrix()
    T[:3, 3] = t
    return T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pnp_recovers_poses_from_exact_point_maps(seed):
    s = synthetic_scene(num_views=4, height=36, width=48, seed=seed)
    focal = estimate_focal(s["xyz_global"][0])
    assert focal == pytest.approx(s["K"][0, 0, 0], rel=1e-6)
    c2w, ok = pnp_poses(s["xyz_global"], intrinsics(focal, 36, 48), seed=seed)
    assert ok.all()
    rot, trans = relative_pose_errors(c2w, s["c2w"])
    assert rot.max() < 0.5 and trans.max() < 0.5
    # absolute poses in view 0's frame as well
    expected = np.linalg.inv(s["c2w"][0]) @ s["c2w"]
    assert np.allclose(c2w, expected, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_procrustes_recovers_poses_from_exact_point_maps(seed):
    s = synthetic_scene(num_views=4, height=24, width=32, seed=seed)
    conf = np.ones(s["depth"].shape)
    c2w, scale = procrustes_poses(0.5 * s["xyz_local"], s["xyz_global"], conf)
    rot, trans = relative_pose_errors(c2w, s["c2w"])
    assert rot.max() < 0.5 and trans.max() < 0.5
    assert np.allclose(scale, 2.0)


def test_focal_and_pnp_are_robust_to_outliers():
    s = synthetic_scene(num_views=3, height=36, width=48, seed=7)
    pts = s["xyz_global"].copy()
    rng = np.random.default_rng(0)
    bad = rng.random(pts.shape[:3]) < 0.1
    pts[bad] += rng.normal(0, 0.5, size=(bad.sum(), 3))
    focal = estimate_focal(pts[0])
    assert focal == pytest.approx(s["K"][0, 0, 0], rel=0.02)
    # 2 px at 48 px wide is about Fast3R's 5 px at 512 px wide, relatively
    c2w, ok = pnp_poses(pts, intrinsics(focal, 36, 48), reprojection_px=2.0)
    rot, trans = relative_pose_errors(c2w, s["c2w"])
    assert ok.all() and rot.max() < 0.5 and trans.max() < 0.5


def test_pnp_reports_failed_views():
    s = synthetic_scene(num_views=2, height=12, width=16, seed=0)
    pts = s["xyz_global"].copy()
    pts[1] = np.nan
    c2w, ok = pnp_poses(pts, s["K"][0])
    assert ok.tolist() == [True, False] and np.array_equal(c2w[1], np.eye(4))
    with pytest.raises(ValueError, match="fewer than 2 points"):
        estimate_focal(-np.abs(s["xyz_global"][0]))


def test_relative_pose_errors_hand_computed():
    ref = np.stack([_pose(), _pose((0, 0, 0), (1, 0, 0)), _pose((0, 30, 0), (0, 0, 2))])
    pred = np.stack([_pose((0, 0, 0), (5, 5, 5)),
                     _pose((0, 0, 0), (5 + 2, 5 + 2, 5)),  # translation rotated by 45 deg
                     _pose((0, 40, 0), (5, 5, 5 + 6))])
    rot, trans = relative_pose_errors(pred, ref)
    # pairs (0,1), (0,2), (1,2)
    assert rot == pytest.approx([0, 10, 10], abs=1e-9)
    assert trans[0] == pytest.approx(45) and trans[1] == pytest.approx(0, abs=1e-6)
    # world frame and scale of either side do not matter
    moved = _pose((20, -50, 10), (3, 1, 2)) @ ref
    moved[:, :3, 3] *= 4.0
    rot2, trans2 = relative_pose_errors(moved, ref)
    assert rot2.max() < 1e-6 and trans2.max() < 1e-5


def test_translation_error_is_blind_to_the_direction_sign_as_in_fast3r():
    """Fast3R's metric compares the lines of the translations: acos(|cos|), in [0, 90]."""
    ref = np.stack([_pose(), _pose((0, 0, 0), (1, 0, 0)), _pose((0, 0, 0), (0, 0, 1))])
    pred = np.stack([_pose(), _pose((0, 0, 0), (-3, 0, 0)),  # reversed: 0 degrees
                     _pose((0, 0, 0), (0, np.sin(np.radians(160)), np.cos(np.radians(160))))])
    _, trans = relative_pose_errors(pred, ref)
    # pairs (0,1), (0,2), (1,2): (1,2) is ref (-1, 0, 1) against pred (3, 0.34, -0.94)
    assert trans[0] == pytest.approx(0, abs=1e-6) and trans[1] == pytest.approx(20)
    assert 0 <= trans.min() and trans.max() <= 90


def test_pose_metrics_hand_computed():
    m = pose_metrics(np.array([1.0, 10.0, 20.0]), np.array([2.0, 3.0, 40.0]))
    assert m["rra_5"] == pytest.approx(1 / 3) and m["rra_15"] == pytest.approx(2 / 3)
    assert m["rta_5"] == pytest.approx(2 / 3) and m["rta_15"] == pytest.approx(2 / 3)
    # max errors 2, 10, 40: under t for t >= 3 (28 of 30), t >= 11 (20 of 30), never
    assert m["maa_30"] == pytest.approx((28 + 20) / 90)
    assert m["rot_err"] == pytest.approx(31 / 3)
    assert all(math.isnan(v) for v in pose_metrics(np.array([]), np.array([])).values())
