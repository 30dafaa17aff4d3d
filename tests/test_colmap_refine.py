"""Pose refinement: tracks from exact point maps are true correspondences, and bundle
adjustment over them pulls perturbed poses back to the truth."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from dataset_fixtures import render_truth
from scipy.spatial.transform import Rotation

from distill3r.colmap_refine import bundle_adjust, consistency_tracks, refine_poses
from distill3r.config import InferParams, TeacherParams
from distill3r.evaluation.poses import relative_pose_errors
from distill3r.geometry import invert_pose
from distill3r.teachers import TeacherInput
from distill3r.teachers.groundtruth import GroundTruthTeacher


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """Ground-truth maps of a rendered demo scene (6 views, 48x64) and the true poses in view
    0's frame."""
    truth = render_truth(tmp_path_factory.mktemp("demo"), num_scenes=1, views=6)[0]
    f = truth.frames
    c2w = np.stack([x.c2w for x in f])
    maps = GroundTruthTeacher(TeacherParams()).predict(TeacherInput(
        images=np.stack([x.image for x in f]), depth=np.stack([x.depth for x in f]),
        K=np.stack([x.K for x in f]), c2w=c2w))
    return maps, f[0].K, invert_pose(c2w[0])[None] @ c2w


def test_tracks_of_exact_maps_are_true_correspondences(exact):
    maps, K, c2w = exact
    tracks = consistency_tracks(maps.xyz_global, maps.mask, c2w, stride=4)
    assert len(tracks) > 50
    N, H, W = maps.mask.shape
    worst = 0.0
    for o in range(len(tracks.view)):  # each observation's true point sees the track's start
        i, p = tracks.view[o], tracks.pixel[o]
        w2c = invert_pose(c2w[i])
        cam = w2c[:3, :3] @ tracks.xyz[tracks.track[o]] + w2c[:3, 3]
        uv = (K @ cam)[:2] / cam[2]
        worst = max(worst, float(np.abs(uv - [p % W, p // W]).max()))
    assert worst < 1.5  # within the reciprocity window (one pixel) plus sampling
    assert np.all(np.diff(tracks.track) >= 0)


def test_bundle_adjustment_pulls_perturbed_poses_back(exact):
    pytest.importorskip("pycolmap")
    maps, K, c2w = exact
    rng = np.random.default_rng(0)
    noisy = c2w.copy()
    for i in range(1, len(c2w)):
        noisy[i, :3, :3] = Rotation.from_rotvec(rng.normal(size=3) * 0.03).as_matrix() \
            @ c2w[i, :3, :3]
        noisy[i, :3, 3] += rng.normal(size=3) * 0.03
    tracks = consistency_tracks(maps.xyz_global, maps.mask, c2w, stride=3)
    refined, summary = bundle_adjust(K, noisy, tracks, maps.mask.shape[1:])
    assert summary["tracks"] == len(tracks)
    np.testing.assert_allclose(refined[0], np.eye(4), atol=1e-9)
    before = relative_pose_errors(noisy, c2w)[0].mean()
    after = relative_pose_errors(refined, c2w)[0].mean()
    assert before > 1.0 and after < before / 5, (before, after)


def test_refine_without_pycolmap_is_a_clear_error(exact, monkeypatch):
    maps, K, c2w = exact
    monkeypatch.setitem(sys.modules, "pycolmap", None)  # `import pycolmap` -> ImportError
    with pytest.raises(ValueError, match=r"infer.refine needs pycolmap"):
        refine_poses(maps.xyz_global, maps.mask, K, c2w, InferParams(refine=True))
