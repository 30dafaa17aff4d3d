"""The ARKitScenes source on demo scenes written in ARKitScenes' low-res layout: time-stamped
PNGs, millimetre depth, .pincam intrinsics and a world-to-camera axis-angle trajectory."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from dataset_fixtures import (TOLERANCE, TruthScene, build, check_images, geometry_error,
                              render_truth, scene_records)
from scipy.spatial.transform import Rotation

from distill3r.data.io import write_image
from distill3r.data.sources.arkitscenes import axis_angle_to_matrix

T0 = 6845.706  # first frame time stamp (seconds)
DT = 0.1  # frame period of the fixture


def stamp(i: int) -> float:
    return round(T0 + DT * i, 3)


def _traj_line(t: float, T: np.ndarray) -> str:
    r = Rotation.from_matrix(T[:3, :3]).as_rotvec()
    return " ".join(f"{v:.9f}" for v in (t, *r, *T[:3, 3]))


def write_arkit(root: Path, truth: list[TruthScene], w2c: bool = True,
                jitter: float = 0.01) -> list[str]:
    """Raw layout for the first scene (``Training/<id>/``), 3DOD layout for the others
    (``Validation/<id>/<id>_frames/``); frames are written in reverse order, pose time stamps
    are off by +-``jitter`` and decoy poses sit 0.04 s from every frame. Returns the ids."""
    ids = []
    for n, scene in enumerate(truth):
        vid = f"{41254925 + 1000 * n}"
        ids.append(vid)
        data = (root / "Training" / vid if n == 0
                else root / "Validation" / vid / f"{vid}_frames")
        lines = []
        h, w = scene.size
        for i, f in reversed(list(enumerate(scene.frames))):
            name = f"{vid}_{stamp(i):.3f}"
            write_image(data / "lowres_wide" / f"{name}.png", f.image)
            (data / "lowres_depth").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(data / "lowres_depth" / f"{name}.png"),
                        np.round(f.depth * 1000).astype(np.uint16))
            (data / "lowres_wide_intrinsics").mkdir(parents=True, exist_ok=True)
            K = f.K
            (data / "lowres_wide_intrinsics" / f"{name}.pincam").write_text(
                f"{w} {h} {K[0, 0]} {K[1, 1]} {K[0, 2]} {K[1, 2]}\n")
            T = f.w2c if w2c else f.c2w
            lines.append(_traj_line(stamp(i) + (jitter if i % 2 else -jitter), T))
            decoy = np.eye(4)
            decoy[:3, 3] = [5.0, -3.0, 2.0]
            lines.append(_traj_line(stamp(i) + 0.04, decoy))
        (data / "lowres_wide.traj").write_text("\n".join(lines) + "\n")
    return ids


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    return render_truth(tmp_path_factory.mktemp("truth") / "demo", num_scenes=2, views=5)


def test_arkitscenes_frames_and_geometry(truth, tmp_path):
    root = tmp_path / "arkit"
    ids = write_arkit(root, truth)
    csv, report = build(tmp_path, "arkitscenes", root)
    assert report["scenes"] == 2 and not report["skipped"] and not report["warnings"]
    for vid, scene in zip(ids, truth):
        records = scene_records(csv, vid)
        assert [Path(r.image).name for r in records] == [
            f"{vid}_{stamp(i):.3f}.png" for i in range(len(scene.frames))]
        assert [r.frame for r in records] == list(range(len(scene.frames)))
        assert all(r.split == "train" and r.depth is not None for r in records)
        check_images(records, scene.frames, lossy=False)
        assert geometry_error(records, scene.frames) < TOLERANCE


def test_arkitscenes_frame_step(truth, tmp_path):
    root = tmp_path / "arkit"
    ids = write_arkit(root, truth)
    csv, _ = build(tmp_path, "arkitscenes", root, {"frame_step": 2})
    records = scene_records(csv, ids[0])
    assert [Path(r.image).name for r in records] == [f"{ids[0]}_{stamp(i):.3f}.png"
                                                     for i in (0, 2, 4)]
    assert geometry_error(records, truth[0].frames[::2]) < TOLERANCE


def test_arkitscenes_camera_to_world_trajectory_is_caught(truth, tmp_path):
    root = tmp_path / "arkit"
    ids = write_arkit(root, truth, w2c=False)
    csv, _ = build(tmp_path, "arkitscenes", root)
    assert geometry_error(scene_records(csv, ids[0]), truth[0].frames) > 10 * TOLERANCE


def test_arkitscenes_frames_without_pose_or_intrinsics_are_dropped(truth, tmp_path):
    root = tmp_path / "arkit"
    ids = write_arkit(root, truth, jitter=0.01)
    data = root / "Training" / ids[0]
    (data / "lowres_wide_intrinsics" / f"{ids[0]}_{stamp(1):.3f}.pincam").unlink()
    lines = (data / "lowres_wide.traj").read_text().splitlines()
    far = [ln for ln in lines if abs(float(ln.split()[0]) - stamp(3)) > 0.045]
    (data / "lowres_wide.traj").write_text("\n".join(far) + "\n")
    csv, report = build(tmp_path, "arkitscenes", root, {"max_time_diff": 0.045})
    names = [Path(r.image).name for r in scene_records(csv, ids[0])]
    assert names == [f"{ids[0]}_{stamp(i):.3f}.png" for i in (0, 2, 4)]
    assert any("pincam" in w and ids[0] in w for w in report["warnings"])
    assert any("no pose within" in w and ids[0] in w for w in report["warnings"])


@pytest.mark.parametrize("problem", ["traj", "traj_bytes", "depth_size", "pincam",
                                     "pincam_width", "pincam_size"])
def test_arkitscenes_bad_scene_is_skipped(truth, tmp_path, problem):
    root = tmp_path / "arkit"
    ids = write_arkit(root, truth)
    data = root / "Validation" / ids[1] / f"{ids[1]}_frames"
    pincam = data / "lowres_wide_intrinsics" / f"{ids[1]}_{stamp(2):.3f}.pincam"
    if problem == "traj":
        (data / "lowres_wide.traj").unlink()
        expect = "lowres_wide.traj"
    elif problem == "traj_bytes":
        traj = data / "lowres_wide.traj"
        traj.write_bytes(traj.read_bytes() + b"\xff\xfe\n")  # not UTF-8
        expect = f"{traj}: unreadable trajectory file"
    elif problem == "pincam_width":
        pincam.write_text("64.5 48 " + pincam.read_text().split(" ", 2)[2])
        expect = f"{pincam}: expected one line"
    elif problem == "pincam_size":
        pincam.write_text("66 48 " + pincam.read_text().split(" ", 2)[2])
        expect = f"{ids[1]}_{stamp(2):.3f}.png: image is 64x48 but the dataset's camera is 66x48"
    elif problem == "depth_size":
        cv2.imwrite(str(data / "lowres_depth" / f"{ids[1]}_{stamp(2):.3f}.png"),
                    np.ones((10, 12), np.uint16))
        expect = f"{ids[1]}_{stamp(2):.3f}.png"
    else:
        pincam.write_text("1 2\n")
        expect = ".pincam"
    csv, report = build(tmp_path, "arkitscenes", root)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == ids[1] and ids[1] in skipped["reason"]
    assert expect in skipped["reason"], skipped["reason"]
    assert geometry_error(scene_records(csv, ids[0]), truth[0].frames) < TOLERANCE


def test_arkitscenes_video_folders_directly_under_root(truth, tmp_path):
    root = tmp_path / "arkit"
    ids = write_arkit(root, truth[:1])
    csv, report = build(tmp_path, "arkitscenes", root / "Training")
    assert report["scenes"] == 1
    assert len(scene_records(csv, ids[0])) == len(truth[0].frames)


def test_axis_angle_matches_scipy():
    rng = np.random.default_rng(0)
    for v in [np.zeros(3), *rng.normal(size=(5, 3))]:
        np.testing.assert_allclose(axis_angle_to_matrix(v),
                                   Rotation.from_rotvec(v).as_matrix(), atol=1e-12)


def test_arkitscenes_loose_files_are_warned_and_hidden_entries_ignored(truth, tmp_path):
    root = tmp_path / "arkit"
    ids = write_arkit(root, truth[:1])
    loose = [root / "metadata.csv", root / "Training" / "video_ids.txt"]
    for path in loose:
        path.write_text("video_id\n")
    (root / ".cache" / "1234").mkdir(parents=True)
    (root / "Training" / ".DS_Store").write_text("")
    csv, report = build(tmp_path, "arkitscenes", root)
    assert report["scenes"] == 1 and len(scene_records(csv, ids[0])) == len(truth[0].frames)
    assert sorted(report["warnings"]) == sorted(f"{p}: not a scene folder, skipped"
                                                for p in loose)
