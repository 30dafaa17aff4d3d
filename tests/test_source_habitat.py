"""The ``habitat`` source on demo truth written the way DUSt3R's habitat generator writes its
renders: nested scene folders, groups of views ``<key>_<view>.jpeg`` with EXR depth and OpenCV
camera-to-world parameters (JSON or NPZ) whose intrinsics put pixel corners at integers."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
from dataset_fixtures import (TOLERANCE, TruthScene, build, check_images,
                              geometry_error, render_truth, scene_records,
                              skipped_reasons)

from distill3r.data.io import write_image
from distill3r.data.sources.habitat import read_exr_depth
from distill3r.geometry import GL_TO_CV, invert_pose

FOLDERS = ["hm3d/train/00800-TEEsavR23oF", "gibson/Adrian"]
NAMES = ["hm3d_train_00800-TEEsavR23oF", "gibson_Adrian"]
# truth frame i of every scene is stored as view LABELS[i]: two groups, out of file order
LABELS = ["00000012_2", "00000007_3", "00000012_1", "00000007_1", "00000007_2"]
ORDER = sorted(range(len(LABELS)), key=lambda i: LABELS[i])  # truth index per frame


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> list[TruthScene]:
    return render_truth(tmp_path_factory.mktemp("truth") / "demo", num_scenes=2, views=5)


def write_exr(path: Path, depth: np.ndarray, channel: str = "Y", half: bool = False) -> None:
    pixels = np.asarray(depth, np.float16 if half else np.float32)
    OpenEXR.File({"type": OpenEXR.scanlineimage}, {channel: pixels}).write(str(path))


def write_habitat(root: Path, truth: list[TruthScene], folders: list[str] = FOLDERS,
                  mistake: str | None = None) -> None:
    """Scene s: JSON camera files and float32 "Y" depth when s is even, NPZ files and float16
    "Z" depth when odd; ``mistake`` writes OpenGL camera axes ("gl") or world-to-camera
    ("w2c") poses instead of the generator's OpenCV camera-to-world."""
    for s, (scene, folder) in enumerate(zip(truth, folders)):
        out = root / folder
        out.mkdir(parents=True)
        (out / "metadata.json").write_text(json.dumps({"multiviews": {}}))
        for f, label in zip(scene.frames, LABELS):
            write_image(out / f"{label}.jpeg", f.image)
            write_exr(out / f"{label}_depth.exr", f.depth, "ZY"[s % 2 == 0], half=s % 2 == 1)
            c2w = {"gl": f.c2w @ GL_TO_CV, "w2c": invert_pose(f.c2w)}.get(mistake, f.c2w)
            K = f.K.copy()
            K[:2, 2] += 0.5  # the generator's cx = W/2: pixel corners at integers
            params = {"camera_intrinsics": K, "R_cam2world": c2w[:3, :3],
                      "t_cam2world": c2w[:3, 3]}
            if s % 2 == 0:
                text = json.dumps({k: v.tolist() for k, v in params.items()})
                (out / f"{label}_camera_params.json").write_text(text)
            else:
                np.savez(out / f"{label}_camera_params.npz", **params)


def test_rows_geometry_and_group_order(truth, tmp_path):
    write_habitat(tmp_path / "raw", truth)
    (tmp_path / "raw" / "hm3d" / "README.txt").write_text("not a scene")
    csv, report = build(tmp_path, "habitat", tmp_path / "raw")
    assert report["scenes"] == 2 and not report["skipped"] and not report["warnings"]
    for scene, name in zip(truth, NAMES):
        records = scene_records(csv, name)
        assert [Path(r.image).stem for r in records] == sorted(LABELS)
        assert [r.frame for r in records] == list(range(5))
        frames = [scene.frames[i] for i in ORDER]
        check_images(records, frames, lossy=True)
        assert geometry_error(records, frames) < TOLERANCE


@pytest.mark.parametrize("mistake", ["gl", "w2c"])
def test_a_wrong_pose_convention_fails(truth, tmp_path, mistake):
    write_habitat(tmp_path / "raw", truth, mistake=mistake)
    csv, _ = build(tmp_path, "habitat", tmp_path / "raw")
    for scene, name in zip(truth, NAMES):
        frames = [scene.frames[i] for i in ORDER]
        assert geometry_error(scene_records(csv, name), frames) > 10 * TOLERANCE


def test_intrinsics_taken_as_written_are_half_a_pixel_off(truth, tmp_path):
    write_habitat(tmp_path / "raw", truth)
    csv, _ = build(tmp_path, "habitat", tmp_path / "raw", {"pixel_corner_intrinsics": False})
    frames = [truth[0].frames[i] for i in ORDER]
    assert geometry_error(scene_records(csv, NAMES[0]), frames) > TOLERANCE


def test_invalid_depth_becomes_zero(truth, tmp_path):
    write_habitat(tmp_path / "raw", truth)
    depth = truth[0].frames[ORDER[0]].depth.copy()
    depth[0, :5], depth[1, :5] = np.inf, 0.0
    write_exr(tmp_path / "raw" / FOLDERS[0] / f"{sorted(LABELS)[0]}_depth.exr", depth)
    csv, _ = build(tmp_path, "habitat", tmp_path / "raw")
    stored = np.load(scene_records(csv, NAMES[0])[0].depth)
    assert stored.dtype == np.float32 and np.all(stored[:2, :5] == 0)
    np.testing.assert_allclose(stored[2:], depth[2:], rtol=1e-6)


def test_exr_channel_choice(tmp_path):
    depth = np.full((3, 4), 2.0, np.float32)
    path = tmp_path / "d.exr"
    OpenEXR.File({"type": OpenEXR.scanlineimage}, {"R": depth * 0, "Z": depth}).write(str(path))
    np.testing.assert_array_equal(read_exr_depth(path), depth)
    write_exr(path, depth, channel="depth")
    np.testing.assert_array_equal(read_exr_depth(path), depth)
    OpenEXR.File({"type": OpenEXR.scanlineimage}, {"A": depth, "B": depth}).write(str(path))
    with pytest.raises(ValueError, match=r"d\.exr: no depth channel among \['A', 'B'\]"):
        read_exr_depth(path)


def write_corrupt_npz(path: Path) -> None:
    """A compressed camera .npz whose first member's deflate block type is the reserved 3."""
    np.savez_compressed(path, camera_intrinsics=np.eye(3), R_cam2world=np.eye(3),
                        t_cam2world=np.zeros(3))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[26:30])  # zip local file header
    data[30 + name_len + extra_len] |= 0x06
    path.write_bytes(bytes(data))
    # what numpy's zip reading raises on it
    with pytest.raises(zlib.error), np.load(path, allow_pickle=False) as npz:
        npz["camera_intrinsics"]


def _replace_camera(folder: Path, label: str, how: str) -> Path:
    """Replace a view's camera file by a malformed .npz or .json file."""
    (camera,) = folder.glob(f"{label}_camera_params.*")
    camera.unlink()
    path = folder / f"{label}_camera_params.{'json' if 'json' in how else 'npz'}"
    if how == "corrupt npz":
        write_corrupt_npz(path)
    elif how == "empty npz":
        path.write_bytes(b"")
    elif how == "npy as npz":
        with open(path, "wb") as f:
            np.save(f, np.eye(3))
    elif how == "nested json":
        path.write_text("[" * 200_000 + "]" * 200_000)
    else:  # "huge json": an integer beyond the float64 range
        path.write_text(json.dumps({"camera_intrinsics": [[10 ** 400, 0, 1], [0, 1, 1],
                                                          [0, 0, 1]],
                                    "R_cam2world": np.eye(3).tolist(), "t_cam2world": [0, 0, 0]}))
    return path


def _break(folder: Path, how: str) -> Path:
    label = sorted(LABELS)[1]
    if how in MALFORMED_CAMERAS:
        return _replace_camera(folder, label, how)
    (camera,) = folder.glob(f"{label}_camera_params.*")  # .json or .npz
    if how == "no camera":
        camera.unlink()
        return folder / f"{label}_camera_params.json"  # the name the source reports
    if how == "bad camera":
        camera.write_text('{"camera_intrinsics": [1, 2')
        return camera
    if how == "no depth":
        (folder / f"{label}_depth.exr").unlink()
        return folder / f"{label}_depth.exr"
    if how == "small exr":
        write_exr(folder / f"{label}_depth.exr", np.ones((24, 32)))
        return folder / f"{label}_depth.exr"
    if how == "bad exr":
        (folder / f"{label}_depth.exr").write_bytes(b"not an exr file")
        return folder / f"{label}_depth.exr"
    raise AssertionError(how)


MALFORMED_CAMERAS = ["corrupt npz", "empty npz", "npy as npz", "nested json", "huge json"]
BROKEN = ["no camera", "bad camera", "no depth", "small exr", "bad exr", *MALFORMED_CAMERAS]


def test_bad_scenes_are_skipped_and_named(truth, tmp_path):
    folders = [FOLDERS[0]] + [f"broken/s{i}" for i in range(len(BROKEN))]
    write_habitat(tmp_path / "raw", [truth[0]] * len(folders), folders=folders)
    broken = {f"broken_s{i}": _break(tmp_path / "raw" / f"broken/s{i}", how)
              for i, how in enumerate(BROKEN)}
    csv, report = build(tmp_path, "habitat", tmp_path / "raw")
    assert report["scenes"] == 1 and len(scene_records(csv, NAMES[0])) == 5
    reasons = skipped_reasons(report, broken)
    assert "camera parameters not found" in reasons["broken_s0"]
    assert "unreadable camera parameters" in reasons["broken_s1"]  # an NPZ file
    assert "depth is 32x24" in reasons["broken_s3"]
    assert "unreadable EXR" in reasons["broken_s4"]
    for i in range(5, 9):
        assert "unreadable camera parameters" in reasons[f"broken_s{i}"], reasons[f"broken_s{i}"]
    assert "camera_intrinsics must be (3, 3) numbers" in reasons["broken_s9"]


def test_incomplete_views_can_be_dropped(truth, tmp_path):
    write_habitat(tmp_path / "raw", truth)
    missing = _break(tmp_path / "raw" / FOLDERS[0], "no camera")
    csv, report = build(tmp_path, "habitat", tmp_path / "raw", {"drop_incomplete_views": True})
    assert not report["skipped"] and report["scenes"] == 2
    (warning,) = report["warnings"]
    assert str(missing) in warning and NAMES[0] in warning
    records = scene_records(csv, NAMES[0])
    kept = [i for i in ORDER if LABELS[i] != sorted(LABELS)[1]]
    assert [Path(r.image).stem for r in records] == [LABELS[i] for i in kept]
    assert geometry_error(records, [truth[0].frames[i] for i in kept]) < TOLERANCE
