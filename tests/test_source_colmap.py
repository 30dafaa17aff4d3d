"""The colmap source on rendered truth written as COLMAP projects: text and binary sparse
models (world-to-camera quaternions, pixel centres at +0.5), .npy metre and 16-bit millimetre
PNG depth maps, distorted cameras and the image_undistorter layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from dataset_fixtures import (TOLERANCE, TruthScene, build, check_images,
                              geometry_error, render_truth, scene_records)

from distill3r.data import colmap_model as cm
from distill3r.data.io import write_image
from distill3r.data.manifest import read_manifest
from distill3r.geometry import invert_pose

IMAGE_IDS = (4, 1, 5, 2, 3)  # ids deliberately not in name order


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> list[TruthScene]:
    return render_truth(tmp_path_factory.mktemp("truth") / "demo", num_scenes=2, views=5)


# ---------------------------------------------------------------- writers (COLMAP layout)

def image_name(index: int) -> str:
    return f"frame_{index:04d}.png"


def colmap_model(scene: TruthScene, camera: str = "PINHOLE", w2c: bool = True) -> cm.Model:
    """The scene as a COLMAP model: one camera per image. ``w2c=False`` is the mistake of
    storing camera-to-world poses."""
    model = cm.Model()
    h, w = scene.size
    for f, image_id in zip(scene.frames, IMAGE_IDS):
        K = f.K
        pinhole = [K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5]
        params = {"PINHOLE": pinhole,
                  "SIMPLE_PINHOLE": [K[0, 0], K[0, 2] + 0.5, K[1, 2] + 0.5],
                  "OPENCV_ZERO": pinhole + [0.0] * 4,
                  "OPENCV": pinhole + [0.1, 0.0, 0.0, 0.0]}[camera]
        model.cameras[image_id] = cm.Camera(image_id, camera.replace("_ZERO", ""), w, h,
                                            np.array(params))
        qvec, tvec = cm.pose_from_c2w(f.c2w if w2c else invert_pose(f.c2w))
        model.images[image_id] = cm.Image(image_id, qvec, tvec, image_id, image_name(f.index),
                                          point3d_ids=np.array([-1, image_id], np.int64),
                                          xys=np.array([[1.5, 2.5], [3.5, 4.5]]))
    for point_id in IMAGE_IDS:
        model.points3d[point_id] = cm.Point3D(point_id, np.zeros(3), np.zeros(3, np.uint8), 0.5,
                                              np.array([point_id]), np.array([1]))
    return model


def write_scene(folder: Path, scene: TruthScene, binary: bool = False, depth: str | None = "npy",
                model: cm.Model | None = None, model_dir: str = "sparse/0",
                images_dir: str = "images") -> None:
    for f in scene.frames:
        write_image(folder / images_dir / image_name(f.index), f.image)
        stem = folder / "depths" / Path(image_name(f.index)).stem
        stem.parent.mkdir(parents=True, exist_ok=True)
        if depth == "npy":
            np.save(stem.with_suffix(".npy"), f.depth.astype(np.float32))
        elif depth == "png":  # millimetres, the option's default unit
            assert f.depth.max() < 65.0
            cv2.imwrite(str(stem.with_suffix(".png")), np.round(f.depth * 1000).astype(np.uint16))
    cm.write_model(model or colmap_model(scene), folder / model_dir, binary=binary)


def write_root(root: Path, truth: list[TruthScene], **kw) -> Path:
    for scene in truth:
        write_scene(root / scene.name, scene, **kw)
    return root


def check_scene_rows(csv: Path, scene: TruthScene) -> None:
    records = scene_records(csv, scene.name)
    assert [r.image.name for r in records] == [image_name(f.index) for f in scene.frames]
    check_images(records, scene.frames, lossy=False)
    assert geometry_error(records, scene.frames) < TOLERANCE


# ---------------------------------------------------------------- tests

def test_text_and_binary_models_give_the_same_manifest(truth, tmp_path):
    rows = {}
    for binary in (False, True):
        root = write_root(tmp_path / f"raw_{binary}", truth, binary=binary)
        csv, report = build(tmp_path / f"out_{binary}", "colmap", root)
        assert report["scenes"] == 2 and not report["skipped"], report
        assert not report["warnings"], report["warnings"]
        for scene in truth:
            check_scene_rows(csv, scene)
        # .npy metres are already the project's encoding: referenced in place, not copied
        assert all(root in r.depth.parents for r in read_manifest(csv))
        rows[binary] = [(r.scene, r.frame, r.image.resolve().relative_to(root).as_posix(),
                         np.load(r.depth).tobytes(), r.K.tolist(), r.c2w.tolist())
                        for r in read_manifest(csv)]
    assert rows[False] == rows[True]


def test_millimetre_png_depth_and_simple_pinhole(truth, tmp_path):
    root = tmp_path / "raw"
    for scene in truth:
        write_scene(root / scene.name, scene, depth="png",
                    model=colmap_model(scene, "SIMPLE_PINHOLE"))
    csv, report = build(tmp_path, "colmap", root)
    assert report["scenes"] == 2 and not report["skipped"]
    for scene in truth:
        records = scene_records(csv, scene.name)
        assert all(r.depth.suffix == ".npy" and "manifest" in r.depth.parts for r in records)
        assert geometry_error(records, scene.frames) < TOLERANCE


def test_png_scale_option(truth, tmp_path):
    scene = truth[0]
    root = tmp_path / scene.name  # a root that is itself one scene
    write_scene(root, scene, depth=None)
    for f in scene.frames:  # depth in 0.25 mm units
        path = root / "depths" / Path(image_name(f.index)).with_suffix(".png")
        cv2.imwrite(str(path), np.round(f.depth * 4000).astype(np.uint16))
    csv, report = build(tmp_path / "out", "colmap", root, {"depth_png_scale": 0.00025})
    assert report["scenes"] == 1
    assert geometry_error(scene_records(csv, scene.name), scene.frames) < TOLERANCE
    csv, _ = build(tmp_path / "out2", "colmap", root)  # the default (mm) is 4x off
    assert geometry_error(scene_records(csv, scene.name), scene.frames) > 10 * TOLERANCE


def test_camera_to_world_written_as_poses_fails_the_geometry_check(truth, tmp_path):
    root = tmp_path / "raw"
    for scene in truth:
        write_scene(root / scene.name, scene, model=colmap_model(scene, w2c=False))
    csv, _ = build(tmp_path, "colmap", root)
    for scene in truth:
        assert geometry_error(scene_records(csv, scene.name), scene.frames) > 10 * TOLERANCE


def test_distorted_camera_skips_the_scene_and_zero_distortion_is_pinhole(truth, tmp_path):
    root = tmp_path / "raw"
    good, bad = truth
    write_scene(root / good.name, good, model=colmap_model(good, "OPENCV_ZERO"))
    write_scene(root / bad.name, bad, model=colmap_model(bad, "OPENCV"), binary=True)
    csv, report = build(tmp_path, "colmap", root)
    (skipped,) = report["skipped"]
    cameras = root / bad.name / "sparse" / "0" / "cameras.bin"
    assert skipped["scene"] == bad.name
    assert str(cameras) in skipped["reason"] and f"scene {bad.name}" in skipped["reason"]
    assert "OPENCV" in skipped["reason"] and "image_undistorter" in skipped["reason"]
    check_scene_rows(csv, good)


def test_undistorted_output_is_used_when_configured(truth, tmp_path):
    root = tmp_path / "raw"
    for scene in truth:  # distorted original model, undistorted copy in dense/
        write_scene(root / scene.name, scene, model=colmap_model(scene, "OPENCV"))
        write_scene(root / scene.name, scene, model_dir="dense/sparse",
                    images_dir="dense/images")
        shutil.rmtree(root / scene.name / "images")
    options = {"undistorted_images": "dense/images", "undistorted_model": "dense/sparse"}
    csv, report = build(tmp_path, "colmap", root, options)
    assert report["scenes"] == 2 and not report["skipped"]
    for scene in truth:
        check_scene_rows(csv, scene)
    with pytest.raises(ValueError, match="must be set together"):
        build(tmp_path / "x", "colmap", root, {"undistorted_images": "dense/images"})


def test_bad_scenes_are_skipped_and_named(truth, tmp_path):
    good, bad = truth
    # a depth map of the wrong size
    root = write_root(tmp_path / "raw", truth)
    depth = root / bad.name / "depths" / "frame_0002.npy"
    np.save(depth, np.ones((10, 12), np.float32))
    csv, report = build(tmp_path / "a", "colmap", root)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == bad.name and str(depth) in skipped["reason"]
    assert f"scene {bad.name}" in skipped["reason"] and "12x10" in skipped["reason"]
    check_scene_rows(csv, good)
    # no model folder at all
    shutil.rmtree(root / bad.name / "sparse")
    csv, report = build(tmp_path / "b", "colmap", root)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == bad.name and "model folder not found" in skipped["reason"]
    assert str(root / bad.name / "sparse" / "0") in skipped["reason"]
    check_scene_rows(csv, good)


def test_model_in_sparse_missing_and_extra_images(truth, tmp_path):
    scene = truth[0]
    root = tmp_path / "raw"
    write_scene(root / scene.name, scene, model_dir="sparse")  # no sparse/0
    (root / scene.name / "images" / image_name(2)).unlink()
    write_image(root / scene.name / "images" / "extra.png", scene.frames[0].image)
    csv, report = build(tmp_path, "colmap", root)
    assert report["scenes"] == 1
    records = scene_records(csv, scene.name)
    kept = [f for f in scene.frames if f.index != 2]
    assert [r.image.name for r in records] == [image_name(f.index) for f in kept]
    assert [r.frame for r in records] == list(range(len(kept)))
    assert geometry_error(records, kept) < TOLERANCE
    warnings = " ".join(report["warnings"])
    assert "not found, skipped: frame_0002.png" in warnings
    assert "not in" in warnings and "extra.png" in warnings


def test_reading_a_scene_with_its_text_model_names_malformed_files(truth, tmp_path):
    good, bad = truth
    root = write_root(tmp_path / "raw", truth)
    images = root / bad.name / "sparse" / "0" / "images.txt"
    images.write_text(images.read_text().replace("frame_0001.png", ""))
    csv, report = build(tmp_path, "colmap", root)
    (skipped,) = report["skipped"]
    assert str(images) in skipped["reason"] and f"scene {bad.name}" in skipped["reason"]
    assert "malformed COLMAP images file: line " in skipped["reason"]
    check_scene_rows(csv, good)


def test_malformed_points3d_file_is_not_read(truth, tmp_path):
    root = write_root(tmp_path / "raw", truth[:1])
    points = root / truth[0].name / "sparse" / "0" / "points3D.txt"
    points.write_text(f"7 0 0 0 1 2 3 0.5 {2 ** 63} 0\nnot a point\n")
    csv, report = build(tmp_path, "colmap", root)
    assert report["scenes"] == 1 and not report["skipped"] and not report["warnings"], report
    check_scene_rows(csv, truth[0])


def test_frames_carry_the_camera_size_as_height_width(truth, tmp_path):
    from distill3r.data.sources.colmap import ColmapSource

    scene = truth[0]
    write_scene(tmp_path / scene.name, scene)
    (read,) = ColmapSource(tmp_path).scenes()
    h, w = scene.size
    assert h != w
    assert all(f.size == (h, w) and "size" not in f.extra for f in read.frames)


def test_8bit_png_depth_skips_the_scene(truth, tmp_path):
    good, bad = truth
    root = write_root(tmp_path / "raw", truth, depth="png")
    depth = root / bad.name / "depths" / "frame_0003.png"
    cv2.imwrite(str(depth), np.full(bad.size, 7, np.uint8))
    csv, report = build(tmp_path, "colmap", root)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == bad.name and str(depth) in skipped["reason"]
    assert "16-bit" in skipped["reason"] and f"scene {bad.name}" in skipped["reason"]
    assert len(scene_records(csv, good.name)) == len(good.frames)
