"""The demo renderer: exact multi-view geometry, determinism, camera rejection, atomic reruns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from distill3r.config import DemoParams
from distill3r.data.demo import FAR, NEAR, _Renderer, intrinsics, render_demo
from distill3r.data.demo_scene import SceneObject, aabb_distance, sample_cameras, sample_layout
from distill3r.data.textures import make_texture
from distill3r.data.io import read_depth, read_image
from distill3r.geometry import depth_to_camera_points, invert_pose, project, transform_points

H, W, VIEWS = 64, 80, 4
PARAMS = DemoParams(num_scenes=2, views_per_scene=VIEWS, height=H, width=W, seed=3, workers=0)
MIN_COVISIBLE = 200  # pixels a pair needs for its depth check to count
GL_FLIP = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV <-> OpenGL camera axes


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert render_demo(root, PARAMS, progress=False) == ["scene_0000", "scene_0001"]
    return root


def load_scene(scene: Path):
    cams = json.loads((scene / "cameras.json").read_text())
    depths = [read_depth(scene / f["depth"]) for f in cams["frames"]]
    Ks = [np.array(f["K"]) for f in cams["frames"]]
    c2ws = [np.array(f["c2w"]) for f in cams["frames"]]
    return cams, depths, Ks, c2ws


def reprojection_error(depth_i, depth_j, K_i, K_j, c2w_i, c2w_j) -> tuple[float, int]:
    """Back-project view i, reproject into view j and compare with view j's depth there.

    Returns the median relative depth error over pixels visible in both views (inside view j,
    not occluded there: a surface more than 0.5 % nearer in view j means occlusion) and
    their count."""
    points = transform_points(invert_pose(c2w_j) @ c2w_i, depth_to_camera_points(depth_i, K_i))
    u, v, z = project(points, K_j)
    h, w = depth_j.shape
    inside = (depth_i > 0) & (z > 0) & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    sampled = cv2.remap(depth_j, u.astype(np.float32), v.astype(np.float32), cv2.INTER_LINEAR)
    rel = (sampled - z) / np.where(z > 0, z, 1.0)
    visible = inside & (sampled > 0) & (rel > -0.005)
    if visible.sum() == 0:
        return float("inf"), 0
    return float(np.median(np.abs(rel[visible]))), int(visible.sum())


def test_layout_and_intrinsics(demo_root):
    for name in ("scene_0000", "scene_0001"):
        cams, depths, Ks, c2ws = load_scene(demo_root / name)
        assert (cams["width"], cams["height"]) == (W, H)
        assert [f["frame"] for f in cams["frames"]] == list(range(VIEWS))
        for f, depth, K, c2w in zip(cams["frames"], depths, Ks, c2ws):
            assert read_image(demo_root / name / f["image"]).shape == (H, W, 3)
            assert depth.shape == (H, W)
            assert depth.min() > 0.3 and depth.max() < 6.5  # closed room: every pixel valid
            assert K[0, 2] == W / 2 and K[1, 2] == H / 2 - 1  # TinyRenderer's principal point
            assert K[0, 0] == pytest.approx(K[1, 1], rel=1e-6) and K[0, 0] > 0
            np.testing.assert_allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-9)
            assert np.linalg.det(c2w[:3, :3]) == pytest.approx(1.0)
            np.testing.assert_array_equal(c2w[3], [0, 0, 0, 1])


def test_multiview_depth_is_consistent(demo_root):
    """Every view's depth, reprojected with K and c2w into every other view, matches the
    depth that view rendered (median relative error < 1e-3 on co-visible pixels)."""
    for name in ("scene_0000", "scene_0001"):
        _, depths, Ks, c2ws = load_scene(demo_root / name)
        checked = 0
        for i in range(VIEWS):
            for j in range(VIEWS):
                if i == j:
                    continue
                err, n = reprojection_error(depths[i], depths[j], Ks[i], Ks[j], c2ws[i], c2ws[j])
                if n >= MIN_COVISIBLE:
                    assert err < 1e-3, (name, i, j, err, n)
                    checked += 1
        assert checked >= 2 * (VIEWS - 1), f"{name}: too few overlapping view pairs"



@pytest.mark.parametrize("wrong", ["c2w_as_w2c", "opengl_axes", "centred_principal_point"])
def test_wrong_convention_fails_the_check(demo_root, wrong):
    """The same check rejects a wrong camera convention, so the test above can fail."""
    for name in ("scene_0000", "scene_0001"):
        _, depths, Ks, c2ws = load_scene(demo_root / name)
        if wrong == "c2w_as_w2c":
            c2ws = [invert_pose(c) for c in c2ws]
        elif wrong == "opengl_axes":
            c2ws = [c @ GL_FLIP for c in c2ws]
        else:
            Ks = [np.array([[K[0, 0], 0, (W - 1) / 2], [0, K[1, 1], (H - 1) / 2], [0, 0, 1]])
                  for K in Ks]
        for i in range(VIEWS - 1):
            err, n = reprojection_error(depths[i], depths[i + 1], Ks[i], Ks[i + 1],
                                        c2ws[i], c2ws[i + 1])
            assert n < MIN_COVISIBLE or err > 1e-3, (name, wrong, i, err, n)


def test_cameras_keep_away_from_objects(demo_root):
    for name in ("scene_0000", "scene_0001"):
        meta = json.loads((demo_root / name / "scene.json").read_text())
        _, _, _, c2ws = load_scene(demo_root / name)
        assert len(meta["objects"]) >= 1
        lo, hi = np.array(meta["room"][0]), np.array(meta["room"][1])
        for c2w in c2ws:
            eye = c2w[:3, 3]
            assert np.all(eye > lo) and np.all(eye < hi)
            for obj in meta["objects"]:
                assert aabb_distance(eye, obj["aabb_min"], obj["aabb_max"]) >= \
                    PARAMS.min_object_distance


def test_object_aabbs_bound_the_rendered_object_pixels(tmp_path):
    """The AABBs used for camera rejection contain every pixel pybullet renders for the object
    (segmentation ids: the 6 room surfaces first, then the parts in layout order)."""
    import pybullet_data

    data_dir = pybullet_data.getDataPath()
    for i in range(3):
        layout, poses, _ = sample_layout(np.random.default_rng([9, i]), 2, 3, 6, 120.0, 0.5,
                                         data_dir)
        owner = [o for o in layout.objects for _ in o.parts]
        renderer = _Renderer(layout, data_dir, tmp_path)
        K, proj = intrinsics(layout.fov_deg, W, H)
        try:
            for c2w in poses:
                view = (GL_FLIP @ invert_pose(c2w)).T.reshape(-1).tolist()
                _, _, _, zbuf, seg = renderer.pb.getCameraImage(
                    W, H, view, proj, renderer=renderer.pb.ER_TINY_RENDERER,
                    physicsClientId=renderer.cid)
                seg = np.reshape(seg, (H, W))
                depth = FAR * NEAR / (FAR - (FAR - NEAR) * np.reshape(zbuf, (H, W)))
                world = transform_points(c2w, depth_to_camera_points(depth, K))
                assert (seg >= len(layout.surfaces)).any()
                for body in np.unique(seg[seg >= len(layout.surfaces)]):
                    obj = owner[body - len(layout.surfaces)]
                    pts = world[seg == body]
                    outside = np.maximum(np.array(obj.aabb_min) - pts, pts - np.array(obj.aabb_max))
                    assert outside.max() < 5e-3, (obj.kind, outside.max())
        finally:
            renderer.close()


def test_camera_rejection_resamples_and_reports_impossible():
    rng = np.random.default_rng(0)
    # an object right on the orbit: many proposals are rejected, all accepted poses are far
    box = SceneObject("block", [], [1, 1, 1, 1], [1.6, -0.3, 0.0], [2.0, 0.3, 0.6])
    poses, _, rejected = sample_cameras(rng, 24, 360.0, [box], 0.5)
    assert rejected > 0 and len(poses) == 24
    assert all(aabb_distance(p[:3, 3], box.aabb_min, box.aabb_max) >= 0.5 for p in poses)
    with pytest.raises(ValueError, match="min_object_distance"):
        sample_cameras(rng, 4, 120.0, [box], 10.0)


def test_same_seed_same_bytes_in_parallel_and_other_seed_differs(demo_root, tmp_path):
    render_demo(tmp_path / "again", replace(PARAMS, workers=2), progress=False)
    files = sorted(p.relative_to(demo_root) for p in demo_root.rglob("*") if p.is_file())
    assert len(files) == 2 * (2 * VIEWS + 2)
    for rel in files:
        assert (tmp_path / "again" / rel).read_bytes() == (demo_root / rel).read_bytes(), rel
    render_demo(tmp_path / "other", replace(PARAMS, seed=4, num_scenes=1), progress=False)
    a = read_image(demo_root / "scene_0000/rgb/000000.png")
    b = read_image(tmp_path / "other/scene_0000/rgb/000000.png")
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_images_have_texture(demo_root):
    """Views carry enough image gradients for a network to match features."""
    for rgb in demo_root.glob("scene_*/rgb/*.png"):
        gray = cv2.cvtColor(read_image(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)
        grad = np.abs(np.diff(gray, axis=1)).mean() + np.abs(np.diff(gray, axis=0)).mean()
        assert gray.std() > 10 and grad > 4, rgb


def test_rerun_skips_complete_scenes_and_repairs_interrupted_ones(tmp_path):
    params = replace(PARAMS, num_scenes=2, views_per_scene=2, height=32, width=32)
    render_demo(tmp_path, params, progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    # simulate an interrupted run: a leftover temporary folder and an incomplete scene
    (tmp_path / ".tmp-scene_0001-999" / "rgb").mkdir(parents=True)
    (tmp_path / "scene_0001" / "scene.json").unlink()
    (tmp_path / "scene_0005").mkdir()  # beyond num_scenes: stale
    render_demo(tmp_path, params, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene_0000", "scene_0001"]
    for path, mtime in stamp.items():
        same = path.stat().st_mtime_ns == mtime
        assert same == ("scene_0000" in str(path)), path
    assert (tmp_path / "scene_0001" / "scene.json").is_file()
    # changed parameters re-render the scene with the new settings
    render_demo(tmp_path, replace(params, views_per_scene=3, num_scenes=1), progress=False)
    assert len(list((tmp_path / "scene_0000" / "rgb").iterdir())) == 3
    assert not (tmp_path / "scene_0001").exists()


def test_bad_params_name_the_key():
    for key, value in [("num_scenes", 0), ("objects_max", 1), ("orbit_degrees", 400.0)]:
        params = replace(PARAMS, objects_min=2, **{key: value})
        with pytest.raises(ValueError, match=f"demo.{key}"):
            params.validate()


def test_textures_are_deterministic():
    for style in ("marble", "tiles", "bricks", "checker", "wood", "dots"):
        a = make_texture(np.random.default_rng(1), style, 64)
        b = make_texture(np.random.default_rng(1), style, 64)
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown texture style"):
        make_texture(np.random.default_rng(0), "plaid")
