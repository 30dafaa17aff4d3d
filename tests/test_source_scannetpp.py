"""The ScanNet++ DSLR source on demo scenes written in ScanNet++'s layout: nerfstudio
transforms (OpenGL c2w, corner-origin principal point), JPG images, millimetre depth rendered
with the fisheye camera (or already pinhole)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from dataset_fixtures import (TOLERANCE, TruthScene, build, check_images,
                              geometry_error, render_truth, scene_records)

from distill3r.geometry import GL_TO_CV

FISHEYE_K = (0.08, -0.03, 0.01, -0.002)
FISHEYE_SCALE = 4  # the fisheye depth is rendered 4x larger so the nearest-neighbour round trip
FISHEYE_FOCAL = 3.0  # back to the pinhole image is exact (focal 3x the pinhole one)


def _fisheye_camera(frame) -> dict:
    h, w = frame.depth.shape
    return {"fl_x": FISHEYE_FOCAL * frame.K[0, 0], "fl_y": FISHEYE_FOCAL * frame.K[1, 1],
            "cx": (FISHEYE_SCALE * w - 1) / 2 + 0.3, "cy": (FISHEYE_SCALE * h - 1) / 2 - 0.2,
            "w": FISHEYE_SCALE * w, "h": FISHEYE_SCALE * h}


def _fisheye_depth(frame, cam: dict, pinhole: dict) -> np.ndarray:
    """Truth depth seen by the fisheye camera: every fisheye pixel's ray (OpenCV fisheye model
    inverted by Newton steps) through the pinhole camera, nearest pixel; raw transforms values
    in both, as the toolkit's undistortion maps use them."""
    v, u = np.mgrid[0:cam["h"], 0:cam["w"]].astype(np.float64)
    xd, yd = (u - cam["cx"]) / cam["fl_x"], (v - cam["cy"]) / cam["fl_y"]
    rd = np.hypot(xd, yd)
    k1, k2, k3, k4 = FISHEYE_K
    theta = rd.copy()
    for _ in range(20):
        t2 = theta ** 2
        f = theta * (1 + k1 * t2 + k2 * t2 ** 2 + k3 * t2 ** 3 + k4 * t2 ** 4) - rd
        df = 1 + 3 * k1 * t2 + 5 * k2 * t2 ** 2 + 7 * k3 * t2 ** 3 + 9 * k4 * t2 ** 4
        theta -= f / df
    r = np.tan(np.clip(theta, 0, 1.5))
    s = np.where(rd > 1e-12, r / np.maximum(rd, 1e-12), 1.0)
    pu = np.rint(pinhole["fl_x"] * s * xd + pinhole["cx"]).astype(int)
    pv = np.rint(pinhole["fl_y"] * s * yd + pinhole["cy"]).astype(int)
    h, w = frame.depth.shape
    inside = (pu >= 0) & (pu < w) & (pv >= 0) & (pv < h) & (theta < 1.4)
    out = np.zeros(u.shape, np.float32)
    out[inside] = frame.depth[pv[inside], pu[inside]]
    return out


def _write_jpg(path: Path, image: np.ndarray) -> None:
    """JPG at quality 100 without chroma subsampling: the demo's 64x48 textures lose too much
    colour otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = [cv2.IMWRITE_JPEG_QUALITY, 100,
             cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]), flags)


def _write_mm(path: Path, depth: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.round(depth * 1000).astype(np.uint16))


def write_scannetpp(root: Path, truth: list[TruthScene], with_data: bool = True,
                    gl: bool = True, depth: str = "fisheye") -> dict[str, list[str]]:
    """Write ``truth`` as ScanNet++ scenes; returns the image names per scene in truth order.
    Also writes a bad frame (is_bad) and lists frames out of order; the last truth frame is a
    test frame."""
    names = {}
    for scene in truth:
        dslr = (root / "data" if with_data else root) / scene.name / "dslr"
        h, w = scene.size
        K = scene.frames[0].K
        pinhole = {"fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2] + 0.5, "cy": K[1, 2] + 0.5,
                   "w": w, "h": h}
        fisheye = _fisheye_camera(scene.frames[0])
        entries, names[scene.name] = [], []
        for i, f in enumerate(scene.frames):
            name = f"DSC{1200 + 7 * i:05d}.JPG"
            names[scene.name].append(name)
            _write_jpg(dslr / "resized_undistorted_images" / name, f.image)
            T = f.c2w @ GL_TO_CV if gl else f.c2w
            entries.append({"file_path": name, "transform_matrix": T.tolist(), "is_bad": False,
                            "mask_path": name.replace(".JPG", ".png")})
            if depth == "fisheye":
                _write_mm(dslr / "render_depth" / name.replace(".JPG", ".png"),
                          _fisheye_depth(f, fisheye, pinhole))
            elif depth == "pinhole":
                _write_mm(dslr / "render_depth" / name.replace(".JPG", ".png"), f.depth)
        bad = "DSC01201.JPG"
        _write_jpg(dslr / "resized_undistorted_images" / bad, scene.frames[0].image)
        entries.append({"file_path": bad, "transform_matrix": np.eye(4).tolist(),
                        "is_bad": True})
        train, test = entries[:-2][::-1] + entries[-1:], entries[-2:-1]
        common = {"camera_model": "PINHOLE", "k1": 0.0, "k2": 0.0, "k3": 0.0, "k4": 0.0,
                  "has_mask": True, "aabb_scale": 16}
        nerf = dslr / "nerfstudio"
        nerf.mkdir(parents=True)
        (nerf / "transforms_undistorted.json").write_text(json.dumps(
            {**pinhole, **common, "frames": train, "test_frames": test}, indent=1))
        k1, k2, k3, k4 = FISHEYE_K
        (nerf / "transforms.json").write_text(json.dumps(
            {**fisheye, **common, "camera_model": "OPENCV_FISHEYE", "k1": k1, "k2": k2,
             "k3": k3, "k4": k4, "frames": train, "test_frames": test}))
        (dslr / "train_test_lists.json").write_text(json.dumps(
            {"train": [e["file_path"] for e in train], "test": [e["file_path"] for e in test]}))
    return names


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    return render_truth(tmp_path_factory.mktemp("truth") / "demo", num_scenes=2, views=4)


def _check_scenes(csv: Path, truth: list[TruthScene], names: dict[str, list[str]]) -> None:
    for scene in truth:
        records = scene_records(csv, scene.name)
        assert [Path(r.image).name for r in records] == names[scene.name]
        assert [r.frame for r in records] == list(range(len(scene.frames)))
        assert all(r.split == "train" for r in records)
        check_images(records, scene.frames, lossy=True)
        assert geometry_error(records, scene.frames) < TOLERANCE


def test_scannetpp_fisheye_rendered_depth(truth, tmp_path):
    root = tmp_path / "scannetpp"
    names = write_scannetpp(root, truth)
    csv, report = build(tmp_path, "scannetpp", root)
    assert report["scenes"] == 2 and not report["skipped"]
    _check_scenes(csv, truth, names)
    assert all(str(r.depth).endswith(".npy") for r in scene_records(csv, truth[0].name))


def test_scannetpp_pinhole_depth_without_data_folder(truth, tmp_path):
    root = tmp_path / "scannetpp"
    names = write_scannetpp(root, truth, with_data=False, depth="pinhole")
    csv, report = build(tmp_path, "scannetpp", root, {"depth_camera": "pinhole"})
    assert report["scenes"] == 2 and not report["skipped"]
    _check_scenes(csv, truth, names)


def test_scannetpp_frame_options_and_no_depth(truth, tmp_path):
    root = tmp_path / "scannetpp"
    names = write_scannetpp(root, truth, depth="none")
    csv, report = build(tmp_path, "scannetpp", root,
                        {"include_test_frames": False, "skip_bad_frames": False})
    records = scene_records(csv, truth[0].name)
    expected = sorted(names[truth[0].name][:-1] + ["DSC01201.JPG"])
    assert [Path(r.image).name for r in records] == expected
    assert all(r.depth is None for r in records)


def test_scannetpp_opencv_pose_is_caught(truth, tmp_path):
    root = tmp_path / "scannetpp"
    write_scannetpp(root, truth, gl=False)
    csv, _ = build(tmp_path, "scannetpp", root)
    records = scene_records(csv, truth[0].name)
    assert geometry_error(records, truth[0].frames) > 10 * TOLERANCE


@pytest.mark.parametrize("problem", ["fisheye", "missing", "depth_size", "fisheye_depth_size",
                                     "image_size", "nested_json", "huge_focal", "huge_matrix"])
def test_scannetpp_bad_scene_is_skipped(truth, tmp_path, problem):
    root = tmp_path / "scannetpp"
    names = write_scannetpp(root, truth, depth="fisheye" if problem != "depth_size"
                            else "pinhole")
    bad = truth[1].name
    nerf = root / "data" / bad / "dslr" / "nerfstudio"
    transforms = nerf / "transforms_undistorted.json"
    expect = {"fisheye": ("transforms_undistorted.json", "dslr.undistort"),
              "missing": ("transforms_undistorted.json", "not found"),
              "depth_size": (".png", "depth is"),
              "fisheye_depth_size": (".png", "fisheye depth is"),
              "image_size": (names[bad][1], "image is 32x24", "camera is 64x48"),
              "nested_json": ("transforms_undistorted.json", "recursion depth"),
              "huge_focal": ("transforms_undistorted.json", "'fl_x'"),
              "huge_matrix": ("transforms_undistorted.json", "transform_matrix")}[problem]
    meta = json.loads(transforms.read_text())
    if problem == "fisheye":
        meta.update(camera_model="OPENCV_FISHEYE", k1=0.1)
        transforms.write_text(json.dumps(meta))
    elif problem == "missing":
        transforms.unlink()
    elif problem == "image_size":
        image = root / "data" / bad / "dslr" / "resized_undistorted_images" / names[bad][1]
        _write_jpg(image, truth[1].frames[1].image[::2, ::2])
    elif problem == "nested_json":
        transforms.write_text("[" * 200_000 + "]" * 200_000)
    elif problem == "huge_focal":
        meta["fl_x"] = 10 ** 400  # a JSON integer beyond the float64 range
        transforms.write_text(json.dumps(meta))
    elif problem == "huge_matrix":
        meta["frames"][0]["transform_matrix"][0][0] = 10 ** 400
        transforms.write_text(json.dumps(meta))
    else:
        depth = root / "data" / bad / "dslr" / "render_depth" / names[bad][1].replace("JPG", "png")
        _write_mm(depth, np.ones((10, 12), np.float32))
    options = {"depth_camera": "pinhole"} if problem == "depth_size" else {}
    csv, report = build(tmp_path, "scannetpp", root, options)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == bad and bad in skipped["reason"]
    for part in expect:
        assert part in skipped["reason"], skipped["reason"]
    assert geometry_error(scene_records(csv, truth[0].name), truth[0].frames) < TOLERANCE


def test_scannetpp_rejects_an_unknown_depth_camera(tmp_path):
    with pytest.raises(ValueError, match="depth_camera"):
        build(tmp_path, "scannetpp", tmp_path, {"depth_camera": "equirect"})


def test_scannetpp_frames_without_image_are_dropped_with_a_warning(truth, tmp_path):
    root = tmp_path / "scannetpp"
    names = write_scannetpp(root, truth, depth="none")
    hidden = names[truth[0].name][-1]  # the test frame, as in hidden-test scenes
    (root / "data" / truth[0].name / "dslr" / "resized_undistorted_images" / hidden).unlink()
    csv, report = build(tmp_path, "scannetpp", root)
    records = scene_records(csv, truth[0].name)
    assert [Path(r.image).name for r in records] == names[truth[0].name][:-1]
    assert any(hidden in w and truth[0].name in w for w in report["warnings"])
