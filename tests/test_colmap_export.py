"""The COLMAP export: read back by the project's reader and by pycolmap, points reproject into
their source pixels, and a ground-truth reconstruction gives back the true cameras."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_fixtures import render_truth

from distill3r.colmap_export import SPARSE, ExportView, export_image, write_colmap
from distill3r.config import InferParams, TeacherParams
from distill3r.data.colmap_model import camera_K, image_c2w, image_w2c, read_model
from distill3r.data.io import read_image, write_image
from distill3r.data.view import ViewChain, ViewTransform, view_chain
from distill3r.evaluation.poses import confident_pixels, pnp_poses
from distill3r.geometry import invert_pose
from distill3r.inference import run_inference
from distill3r.models import build_student, save_student
from distill3r.teachers import TeacherInput
from distill3r.teachers.groundtruth import GroundTruthTeacher

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """One rendered demo scene (5 views, 48x64) with its exact depth, K and poses, and the
    folder it was written to."""
    root = tmp_path_factory.mktemp("demo")
    return render_truth(root, num_scenes=1, views=5)[0], root


def _glob_images(scene) -> list[Path]:
    truth, root = scene
    return sorted((root / truth.name / "rgb").glob("*.png"))


def _reprojection_px(model, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per observation of ``image_id``: the distance of its point's projection from it (px),
    and the observation pixels (project convention)."""
    image = model.images[image_id]
    K = camera_K(model.cameras[image.camera_id])
    w2c = image_w2c(image)
    xyz = np.array([model.points3d[int(i)].xyz for i in image.point3d_ids]).reshape(-1, 3)
    cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam @ K.T
    uv = uv[:, :2] / uv[:, 2:3]
    xy = image.xys - 0.5
    return np.linalg.norm(uv - xy, axis=1), xy


def _check_tracks(model) -> None:
    """Every point's one-element track names an observation that names the point back."""
    for pid, point in model.points3d.items():
        assert len(point.image_ids) == 1
        image = model.images[int(point.image_ids[0])]
        assert image.point3d_ids[int(point.point2d_idxs[0])] == pid


def _pycolmap_max_error(folder: Path, expected_images: int) -> float:
    pycolmap = pytest.importorskip("pycolmap")
    rec = pycolmap.Reconstruction(str(folder))
    assert rec.num_reg_images() == expected_images
    worst = 0.0
    for point in rec.points3D.values():
        for el in point.track.elements:
            image = rec.images[el.image_id]
            xy = rec.cameras[image.camera_id].img_from_cam(image.cam_from_world() * point.xyz)
            worst = max(worst, float(np.linalg.norm(xy - image.points2D[el.point2D_idx].xy)))
    return worst


def test_view_chain_inverts_crop_resize_and_shrink():
    chain = view_chain((900, 1300), 60, (56, 84))  # shrink (900 > 2*60), then crop + resize
    assert len(chain.steps) == 2 and chain.src_hw == (900, 1300) and chain.out_hw == (56, 84)
    K_src = np.array([[1000.0, 0, 640], [0, 990.0, 455], [0, 0, 1]])
    K_out = chain.steps[1].intrinsics(chain.steps[0].intrinsics(K_src))
    np.testing.assert_allclose(chain.source_intrinsics(K_out), K_src, atol=1e-9)
    u, v = np.array([0.0, 10.5, 83.0]), np.array([0.0, 20.25, 55.0])
    x, y = chain.to_source(u, v)
    for step in chain.steps:
        x, y = step.to_output(x, y)
    np.testing.assert_allclose(np.stack([x, y]), np.stack([u, v]), atol=1e-9)
    with pytest.raises(ValueError, match="does not feed"):
        ViewChain((ViewTransform.cover((10, 10), (5, 5)), ViewTransform.cover((6, 6), (3, 3))))


def test_ground_truth_export_reproduces_the_true_cameras(scene, tmp_path):
    """Exact point maps at a cropped, resized resolution -> PnP -> export: the model's cameras
    are the demo's K (at the source size) and true poses in view 0's frame (the similarity
    is the identity: the ground truth is metric), and the points are the true points."""
    truth, _ = scene
    frames = truth.frames
    out_hw = (28, 42)  # another aspect than 48x64: a crop, and fx != fy after rounding
    chains = [ViewChain((ViewTransform.cover(f.depth.shape, out_hw),)) for f in frames]
    images = np.stack([c.image(f.image) for c, f in zip(chains, frames)])
    depth = np.stack([c.steps[0].depth(f.depth) for c, f in zip(chains, frames)])
    K = chains[0].steps[0].intrinsics(frames[0].K)
    c2w_true = np.stack([f.c2w for f in frames])
    maps = GroundTruthTeacher(TeacherParams()).predict(TeacherInput(
        images=images, depth=depth.astype(np.float32), K=np.stack([K] * len(frames)),
        c2w=c2w_true))
    keep, _ = confident_pixels(maps.xyz_global, maps.conf_local, 10.0)
    keep &= maps.mask
    c2w, ok = pnp_poses(maps.xyz_global, K, keep, reprojection_px=0.5)
    c2w[0] = np.eye(4)
    assert ok[1:].all()
    paths = _glob_images(scene)
    views = [ExportView(p, c) for p, c in zip(paths, chains)]

    def points(i):
        idx = np.flatnonzero(keep[i])
        return idx, maps.xyz_global[i].reshape(-1, 3)[idx], images[i].reshape(-1, 3)[idx]

    summary = write_colmap(tmp_path / "export", views, K, c2w, points)
    model = read_model(tmp_path / "export" / SPARSE)
    assert summary["points"] == len(model.points3d) == int(keep.sum())
    assert len(model.cameras) == 1 and model.cameras[1].model == "PINHOLE"
    assert (model.cameras[1].height, model.cameras[1].width) == frames[0].depth.shape
    np.testing.assert_allclose(camera_K(model.cameras[1]), frames[0].K, atol=1e-6)
    expected = invert_pose(c2w_true[0])[None] @ c2w_true
    for i in range(len(frames)):
        np.testing.assert_allclose(image_c2w(model.images[i + 1]), expected[i], atol=1e-4)
        err, _ = _reprojection_px(model, i + 1)
        assert err.max() < 0.5
    _check_tracks(model)
    xyz = np.stack([p.xyz for p in model.points3d.values()])
    np.testing.assert_allclose(xyz, maps.xyz_global[keep], atol=1e-4)
    for p in paths:  # the source files themselves, byte for byte
        assert (tmp_path / "export" / "images" / p.name).read_bytes() == p.read_bytes()
    assert _pycolmap_max_error(tmp_path / "export" / SPARSE, len(frames)) < 0.5


@pytest.mark.slow  # a subprocess importing torch: ~15 s on one core
def test_student_export_reads_back_and_every_point_reprojects(scene, tmp_path):
    """The real pipeline (tiny random-weights student) through ``distill3r infer --colmap``:
    both readers accept the model and every point lands within 0.5 px of its source pixel,
    which lies on the model-resolution pixel grid mapped to the source image."""
    torch.manual_seed(0)
    ckpt = save_student(build_student("tiny"), tmp_path / "student")
    scene_dir = _glob_images(scene)[0].parents[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "distill3r", "infer", str(scene_dir), "--checkpoint", str(ckpt),
         "--output-dir", str(tmp_path / "out"), "--size", "42", "--device", "cpu",
         "--colmap", "--no-progress"], capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "out" / f"{scene[0].name}_colmap"
    assert "COLMAP model" in proc.stdout and str(folder) in proc.stdout
    model = read_model(folder / SPARSE)
    assert len(model.images) == 5 and len(model.points3d) > 0
    chain = view_chain((48, 64), 42 + 14, (28, 42))
    for image_id, image in model.images.items():
        assert (folder / "images" / image.name).is_file()
        err, xy = _reprojection_px(model, image_id)
        assert (err < 0.5).all()
        u, v = chain.steps[-1].to_output(xy[:, 0], xy[:, 1])
        np.testing.assert_allclose(u, np.round(u), atol=1e-6)
        np.testing.assert_allclose(v, np.round(v), atol=1e-6)
    _check_tracks(model)
    assert _pycolmap_max_error(folder / SPARSE, 5) < 0.5


def test_export_image_copies_or_reencodes(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    (tmp_path / "out").mkdir()
    write_image(tmp_path / "a.png", pixels)
    assert export_image(tmp_path / "a.png", tmp_path / "out") == "a.png"
    assert (tmp_path / "out" / "a.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    write_image(tmp_path / "b.bmp", pixels)  # not every reader decodes BMP: PNG instead
    assert export_image(tmp_path / "b.bmp", tmp_path / "out") == "b.bmp.png"
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "b.bmp.png"), pixels)


def test_infer_without_colmap_writes_no_model(scene, tmp_path):
    torch.manual_seed(0)
    ckpt = save_student(build_student("tiny"), tmp_path / "student")
    scene_dir = _glob_images(scene)[0].parents[1]
    params = InferParams(size=28, device="cpu", dtype="fp32", preview_views=1)
    (info,) = run_inference(scene_dir, ckpt, tmp_path / "out", params)
    assert info["colmap"] is None and "colmap" not in info["outputs"]
    assert not list((tmp_path / "out").glob("*_colmap"))
