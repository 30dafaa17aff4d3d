"""The megadepth source on rendered truth written in the D2-Net MegaDepth layout: JPEG photos,
h5 depth in SfM units (a global scale), an undistorted COLMAP model (world-to-camera poses,
PINHOLE cameras) with 3D points synthesised from the truth so that covisibility is real."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from dataset_fixtures import (TOLERANCE, TruthScene, build, check_images, geometry_error,
                              render_truth, scene_records, write_jpeg)

from distill3r.data import colmap_model as cm
from distill3r.data.ordering import chain_order
from distill3r.geometry import depth_to_camera_points, invert_pose, transform_points

SCALE = 3.7  # SfM units per metre
SCENE_IDS = ("0015", "5004")
# file names whose sorted order differs from the covisibility chain of the views
NAMES = ("8127453691_5c0f0a3e66_o.jpg", "1043267518_aa90fe2b11_o.jpg",
         "5510982347_02bd45c7e3_o.jpg", "0218836402_e0cd45c1f9_o.jpg",
         "3348201057_9d1f3b6a70_o.jpg")
STEP = 4  # pixel spacing of the synthesised 3D points


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> list[TruthScene]:
    return render_truth(tmp_path_factory.mktemp("truth") / "demo", num_scenes=2, views=5)


# ---------------------------------------------------------------- writers (MegaDepth layout)

def write_h5(path: Path, depth: np.ndarray, dataset: str = "depth") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(dataset, data=depth.astype(np.float32))


def observations(scene: TruthScene) -> tuple[list[list[tuple[float, float, int]]], dict]:
    """3D points sampled from every view's truth depth (metric world) and, per view, the
    ``(x, y, point id)`` observations of the points it sees (truth depth test)."""
    h, w = scene.size
    obs: list[list[tuple[float, float, int]]] = [[] for _ in scene.frames]
    points: dict[int, np.ndarray] = {}
    for f in scene.frames:
        cam = depth_to_camera_points(f.depth, f.K)[::STEP, ::STEP].reshape(-1, 3)
        world = transform_points(f.c2w, cam[cam[:, 2] > 0])
        for X in world:
            pid = len(points) + 1
            points[pid] = X
            for j, g in enumerate(scene.frames):
                x = transform_points(g.w2c, X[None])[0]
                if x[2] <= 0:
                    continue
                u, v = g.K[0, 0] * x[0] / x[2] + g.K[0, 2], g.K[1, 1] * x[1] / x[2] + g.K[1, 2]
                ui, vi = int(round(u)), int(round(v))
                if 0 <= ui < w and 0 <= vi < h and abs(g.depth[vi, ui] - x[2]) < 0.01 * x[2]:
                    obs[j].append((u + 0.5, v + 0.5, pid))  # COLMAP pixel convention
    return obs, points


def sfm_model(scene: TruthScene, w2c: bool = True) -> cm.Model:
    """The undistorted SfM model in SfM units; ``w2c=False`` writes camera-to-world poses."""
    obs, points = observations(scene)
    h, w = scene.size
    model = cm.Model()
    for i, f in enumerate(scene.frames):
        K = f.K
        model.cameras[i + 1] = cm.Camera(i + 1, "PINHOLE", w, h,
                                         np.array([K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5]))
        c2w = f.c2w.copy()
        c2w[:3, 3] *= SCALE
        qvec, tvec = cm.pose_from_c2w(c2w if w2c else invert_pose(c2w))
        xy = np.array([o[:2] for o in obs[i]]).reshape(-1, 2)
        model.images[i + 1] = cm.Image(i + 1, qvec, tvec, i + 1, NAMES[i], xys=xy,
                                       point3d_ids=np.array([o[2] for o in obs[i]], np.int64))
    for pid, X in points.items():
        track = [(i + 1, k) for i in range(len(scene.frames))
                 for k, o in enumerate(obs[i]) if o[2] == pid]
        model.points3d[pid] = cm.Point3D(pid, X * SCALE, np.array([128, 128, 128], np.uint8),
                                         0.7, np.array([t[0] for t in track]),
                                         np.array([t[1] for t in track]))
    return model


def write_megadepth(root: Path, truth: list[TruthScene], w2c: bool = True) -> Path:
    for scene_id, scene in zip(SCENE_IDS, truth):
        dense = root / "MegaDepth_v1" / scene_id / "dense0"
        for name, f in zip(NAMES, scene.frames):
            write_jpeg(dense / "imgs" / name, f.image)
            write_h5((dense / "depths" / name).with_suffix(".h5"), f.depth * SCALE)
        binary = scene_id == SCENE_IDS[1]  # COLMAP's binary export is accepted as well
        cm.write_model(sfm_model(scene, w2c), root / "Undistorted_SfM" / scene_id / "sparse-txt",
                       binary=binary)
    return root


@pytest.fixture(scope="module")
def layout(truth, tmp_path_factory) -> Path:
    return write_megadepth(tmp_path_factory.mktemp("megadepth") / "raw", truth)


def copy_layout(layout: Path, tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    shutil.copytree(layout, root)
    return root


def expected_order(scene: TruthScene) -> list[str]:
    """Image names along the covisibility chain of the truth observations (name-sorted
    indices, as the source lists them)."""
    obs, _ = observations(scene)
    by_name = sorted(range(len(NAMES)), key=lambda i: NAMES[i])
    seen = [{o[2] for o in obs[i]} for i in by_name]
    affinity = np.array([[len(a & b) for b in seen] for a in seen], np.float64)
    return [NAMES[by_name[k]] for k in chain_order(affinity)]


# ---------------------------------------------------------------- tests

def test_rows_follow_the_covisibility_chain_and_match_the_truth(truth, layout, tmp_path):
    csv, report = build(tmp_path, "megadepth", layout)
    assert report["scenes"] == 2 and not report["skipped"] and not report["warnings"], report
    for scene_id, scene in zip(SCENE_IDS, truth):
        records = scene_records(csv, scene_id)
        names = [r.image.name for r in records]
        assert names == expected_order(scene)
        assert names != sorted(names)  # the chain, not the file names
        views = [NAMES.index(n) for n in names]  # the demo's views lie along a path
        assert views in (sorted(views), sorted(views, reverse=True))
        assert [r.frame for r in records] == list(range(len(NAMES)))
        ordered = [scene.frames[NAMES.index(n)] for n in names]
        check_images(records, ordered, lossy=True)
        assert geometry_error(records, ordered, scale=SCALE) < TOLERANCE
        assert geometry_error(records, ordered, scale=1.0) > 10 * TOLERANCE  # scale matters
        assert all(r.depth.suffix == ".npy" for r in records)


def test_camera_to_world_poses_fail_the_geometry_check(truth, tmp_path):
    root = write_megadepth(tmp_path / "raw", truth, w2c=False)
    csv, _ = build(tmp_path, "megadepth", root)
    for scene_id, scene in zip(SCENE_IDS, truth):
        records = scene_records(csv, scene_id)
        ordered = [scene.frames[NAMES.index(r.image.name)] for r in records]
        assert geometry_error(records, ordered, scale=SCALE) > 10 * TOLERANCE


def test_missing_images_txt_skips_the_scene(truth, layout, tmp_path):
    root = copy_layout(layout, tmp_path)
    images = root / "Undistorted_SfM" / SCENE_IDS[0] / "sparse-txt" / "images.txt"
    images.unlink()
    csv, report = build(tmp_path, "megadepth", root)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == SCENE_IDS[0]
    assert str(images) in skipped["reason"] and f"scene {SCENE_IDS[0]}" in skipped["reason"]
    assert len(scene_records(csv, SCENE_IDS[1])) == len(NAMES)


@pytest.mark.parametrize("problem", ["size", "dataset", "corrupt", "group", "strings", "3d"])
def test_bad_h5_depth_skips_the_scene(truth, layout, tmp_path, problem):
    root = copy_layout(layout, tmp_path)
    depths = root / "MegaDepth_v1" / SCENE_IDS[1] / "dense0" / "depths"
    depth = (depths / NAMES[3]).with_suffix(".h5")
    if problem == "size":
        write_h5(depth, np.ones((24, 32), np.float32))
    elif problem == "dataset":
        write_h5(depth, np.ones(truth[1].size, np.float32), dataset="disparity")
    elif problem == "corrupt":
        depth.write_bytes(b"not an hdf5 file")
    else:
        with h5py.File(depth, "w") as f:
            if problem == "group":
                f.create_group("depth").create_dataset("values", data=np.ones(3))
            elif problem == "strings":
                f.create_dataset("depth", data=np.full(truth[1].size, b"1.5"))
            else:
                f.create_dataset("depth", data=np.ones((2, *truth[1].size), np.float32))
    csv, report = build(tmp_path, "megadepth", root)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == SCENE_IDS[1]
    assert str(depth) in skipped["reason"] and f"scene {SCENE_IDS[1]}" in skipped["reason"]
    expected = {"size": "32x24", "dataset": "no 'depth' dataset", "corrupt": "unreadable h5",
                "group": "is a Group, not a dataset", "strings": "dtype |S3, not numbers",
                "3d": "must be 2-D"}
    assert expected[problem] in skipped["reason"]
    assert len(scene_records(csv, SCENE_IDS[0])) == len(NAMES)


@pytest.mark.parametrize("require_depth", [True, False])
def test_frames_without_depth_and_images_elsewhere(truth, layout, tmp_path, require_depth):
    root = copy_layout(layout, tmp_path)
    dense = root / "MegaDepth_v1" / SCENE_IDS[0] / "dense0"
    (dense / "depths" / NAMES[2]).with_suffix(".h5").unlink()
    (dense / "imgs" / NAMES[4]).unlink()  # e.g. a photo of another dense folder
    csv, report = build(tmp_path, "megadepth", root, {"require_depth": require_depth})
    assert report["scenes"] == 2 and not report["skipped"]
    records = scene_records(csv, SCENE_IDS[0])
    names = [r.image.name for r in records]
    assert NAMES[4] not in names and (NAMES[2] in names) != require_depth
    warnings = " ".join(report["warnings"])
    assert f"not found, skipped: {NAMES[4]}" in warnings
    assert (f"no h5 depth for 1 image(s), skipped: {NAMES[2]}" in warnings) == require_depth
    if not require_depth:
        assert next(r for r in records if r.image.name == NAMES[2]).depth is None


@pytest.mark.parametrize("content", ["mask", "bool_mask", "empty"])
def test_mask_in_place_of_depth_drops_the_frame(truth, layout, tmp_path, content):
    root = copy_layout(layout, tmp_path)
    depth = (root / "MegaDepth_v1" / SCENE_IDS[0] / "dense0" / "depths" / NAMES[1]).with_suffix(
        ".h5")
    foreground = truth[0].frames[1].depth > 2.0  # a 0/1 foreground/background map
    assert 0 < foreground.mean() < 1
    if content == "bool_mask":
        with h5py.File(depth, "w") as f:
            f.create_dataset("depth", data=foreground)
    else:
        write_h5(depth, foreground if content == "mask" else np.zeros(truth[0].size))
    csv, report = build(tmp_path, "megadepth", root)
    assert report["scenes"] == 2 and not report["skipped"], report
    (warning,) = report["warnings"]
    assert str(depth) in warning and f"scene {SCENE_IDS[0]}" in warning
    assert ("no valid depth" if content == "empty" else "a mask") in warning
    records = scene_records(csv, SCENE_IDS[0])
    names = [r.image.name for r in records]
    assert names == [n for n in expected_order(truth[0]) if n != NAMES[1]]
    ordered = [truth[0].frames[NAMES.index(n)] for n in names]
    assert geometry_error(records, ordered, scale=SCALE) < TOLERANCE
    assert len(scene_records(csv, SCENE_IDS[1])) == len(NAMES)


def test_malformed_points3d_file_is_not_read(truth, layout, tmp_path):
    root = copy_layout(layout, tmp_path)
    points = root / "Undistorted_SfM" / SCENE_IDS[0] / "sparse-txt" / "points3D.txt"
    points.write_text(points.read_text() + f"1 0 0 0 1 2 3 0.5 {2 ** 63} 0\n")
    csv, report = build(tmp_path, "megadepth", root)
    assert report["scenes"] == 2 and not report["skipped"] and not report["warnings"], report
    names = [r.image.name for r in scene_records(csv, SCENE_IDS[0])]
    assert names == expected_order(truth[0])  # covisibility from images.txt alone
