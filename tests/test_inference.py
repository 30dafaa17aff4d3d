"""Inference on folders of images with the real ``tiny`` student (random weights)."""

import json
import logging
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from distill3r.config import InferParams
from distill3r.data.io import read_image, write_image
from distill3r.data.view import fit_size
from distill3r.export import read_ply, read_ply_vertices
from distill3r.evaluation.poses import confident_pixels
from distill3r.inference import (find_scenes, load_views, predict, run_inference,
                                 select_points)
from distill3r.models import build_student, load_student, save_student

STAGE = Path(__file__).resolve().parents[1] / "stages" / "infer.py"
PARAMS = InferParams(size=56, device="cpu", dtype="fp32", preview_views=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one thread per module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_student(build_student("tiny"), tmp_path_factory.mktemp("ckpt") / "student")


def _write_images(folder: Path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        write_image(folder / f"frame_{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return folder


# --- scene discovery and loading ----------------------------------------------------------------
def test_find_scenes_layouts_and_warnings(tmp_path, caplog):
    one = _write_images(tmp_path / "one", [(20, 30)] * 3)
    (one / "notes.txt").write_text("not an image")
    (one / ".DS_Store").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="distill3r.inference"):
        scenes = find_scenes(one)
    assert [s.name for s in scenes] == ["one"] and len(scenes[0].images) == 3
    assert "notes.txt" in caplog.text and "DS_Store" not in caplog.text

    root = tmp_path / "many"
    _write_images(root / "b", [(20, 30)] * 2)
    _write_images(root / "a" / "rgb", [(20, 30)] * 12)
    _write_images(root / "a" / "depth", [(20, 30)])  # not picked up: rgb/ is the scene
    (root / "empty").mkdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill3r.inference"):
        scenes = find_scenes(root)
    assert [(s.name, len(s.images)) for s in scenes] == [("a", 12), ("b", 2)]
    assert [p.name for p in scenes[0].images][:3] == ["frame_0.png", "frame_1.png", "frame_2.png"]
    assert "empty" in caplog.text
    assert [s.name for s in find_scenes(root / "a")] == ["a"]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no images found"):
        find_scenes(tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        find_scenes(tmp_path / "nope")


def test_mixed_sizes_and_orientation(tmp_path):
    folder = _write_images(tmp_path / "s", [(60, 80), (90, 50), (100, 70)])
    images, sizes = load_views(find_scenes(folder)[0].images, 112, 14)
    assert sizes == [(60, 80), (90, 50), (100, 70)]
    assert images.shape == (3,) + fit_size(90, 50, 112, 14) + (3,)  # majority portrait
    H, W = images.shape[1:3]
    assert H > W and H % 14 == 0 and W % 14 == 0
    tie = _write_images(tmp_path / "t", [(80, 60), (60, 80)])  # tie: the first image decides
    images, _ = load_views(find_scenes(tie)[0].images, 56, 14)
    assert images.shape[1:3] == fit_size(80, 60, 56, 14) and images.shape[1] > images.shape[2]


def test_select_points_keeps_the_confidence_percentile():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(2, 6, 7, 3))
    conf = rng.uniform(1, 10, size=(2, 6, 7))
    xyz[0, 0, 0] = np.nan
    images = rng.integers(0, 256, (2, 6, 7, 3), dtype=np.uint8)
    keep, thr = confident_pixels(xyz, conf, 25.0)
    points, colors, exported = select_points(xyz, keep, images)
    finite = np.isfinite(xyz).all(-1)
    assert thr == pytest.approx(np.percentile(conf[finite], 25))
    assert len(points) == (finite & (conf >= thr)).sum() == keep.sum() == exported.sum()
    assert np.array_equal(colors, images[keep])
    assert np.array_equal(points, xyz[keep].astype(np.float32))
    capped = select_points(xyz, confident_pixels(xyz, conf, 0.0)[0], images, max_points=10,
                           seed=1)
    assert len(capped[0]) == 10 and capped[2].sum() == 10
    with pytest.raises(ValueError, match="conf_percentile"):
        confident_pixels(xyz, conf, 120.0)


# --- end to end ----------------------------------------------------------------------------------
def test_run_inference_writes_consistent_outputs(tmp_path, checkpoint):
    folder = _write_images(tmp_path / "kitchen", [(48, 64), (64, 48), (50, 70)])
    out = tmp_path / "out"
    (info,) = run_inference(folder, checkpoint, out, PARAMS)
    files = {k: out / f"kitchen_{k}" for k in ("student.ply", "cameras.json", "info.json",
                                                "preview.png")}
    assert all(f.is_file() for f in files.values())
    points, colors = read_ply(files["student.ply"])
    assert len(points) == len(colors) == info["points_kept"]
    vertices = read_ply_vertices(files["student.ply"])  # each point's confidence and view
    assert vertices["confidence"].min() >= info["conf_threshold"]
    assert sorted(set(vertices["view"].tolist())) == [0, 1, 2]
    assert np.all(np.diff(vertices["view"]) >= 0)  # written view by view
    # the count is exactly the confidence filter of the model's own prediction
    model = load_student(checkpoint)
    images, _ = load_views(sorted(folder.iterdir()), PARAMS.size, model.patch_size)
    pred = predict(model, images, torch.device("cpu"), torch.float32)
    conf = pred["conf_local"]
    assert info["points_kept"] == int((conf >= np.percentile(conf, 10)).sum())
    assert info["points_total"] == conf.size and info["resolution"] == list(conf.shape[1:])
    saved = json.loads(files["info.json"].read_text())
    assert saved["views"] == 3 and saved["checkpoint_fingerprint"] == json.loads(
        (checkpoint / "config.json").read_text())["sha256"]
    cams = json.loads(files["cameras.json"].read_text())
    assert [f["image"] for f in cams["frames"]] == ["frame_0.png", "frame_1.png", "frame_2.png"]
    for frame in cams["frames"]:  # random weights: only the form of the poses is checkable
        R = np.array(frame["c2w"])[:3, :3]
        assert np.allclose(R.T @ R, np.eye(3), atol=1e-6) and np.array(frame["K"]).shape == (3, 3)
    assert read_image(files["preview.png"]).ndim == 3


def test_single_image_and_folder_of_scenes(tmp_path, checkpoint):
    root = tmp_path / "scenes"
    _write_images(root / "solo", [(40, 40)])
    _write_images(root / "pair", [(40, 60), (40, 60)], seed=1)
    infos = run_inference(root, checkpoint, tmp_path / "out", PARAMS)
    assert [(i["scene"], i["views"]) for i in infos] == [("pair", 2), ("solo", 1)]
    assert (tmp_path / "out" / "solo_student.ply").is_file()


def test_corrupt_image_is_named(tmp_path, checkpoint):
    folder = _write_images(tmp_path / "s", [(40, 40)] * 2)
    (folder / "frame_1.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="frame_1.png"):
        run_inference(folder, checkpoint, tmp_path / "out", PARAMS)


def test_mismatched_checkpoint_reaches_the_user(tmp_path, checkpoint, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    meta = json.loads((checkpoint / "config.json").read_text())
    meta["config"]["dpt_last_dim"] = 16  # a valid config, but not these weights
    (bad / "config.json").write_text(json.dumps(meta))
    folder = _write_images(tmp_path / "s", [(40, 40)] * 2)
    with pytest.raises(ValueError, match="cannot load the student from .*bad"):
        run_inference(folder, bad, tmp_path / "out", PARAMS)
    main = runpy.run_path(str(STAGE))["main"]
    code = main([str(folder), "--checkpoint", str(bad), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "infer: error: cannot load the student" in err
    assert "weights do not match" in err
    assert main([str(tmp_path / "missing"), "--checkpoint", str(checkpoint),
                 "--output-dir", str(tmp_path / "o")]) == 1
    assert "images folder not found" in capsys.readouterr().err


def test_cli_overrides_params(tmp_path, checkpoint, capsys):
    folder = _write_images(tmp_path / "cli", [(30, 40)] * 2)
    params = tmp_path / "params.yaml"
    params.write_text("infer:\n  size: 112\n  device: cpu\n  dtype: fp32\n")
    main = runpy.run_path(str(STAGE))["main"]
    code = main([str(folder), "--checkpoint", str(checkpoint), "--output-dir",
                 str(tmp_path / "o"), "--size", "28", "--conf-percentile", "50",
                 "--params", str(params)])
    assert code == 0 and "cli: 2 view(s) at 28x28" in capsys.readouterr().out
    info = json.loads((tmp_path / "o" / "cli_info.json").read_text())
    assert info["conf_percentile"] == 50.0 and info["dtype"] == "float32"


# --- one view order, one camera recipe ------------------------------------------------------------
def test_images_manifest_and_inference_share_the_view_order(tmp_path, checkpoint):
    from distill3r.config import DataParams, SourceParams
    from distill3r.data.build import build_manifest
    from distill3r.data.manifest import read_manifest

    scene = tmp_path / "scenes" / "hall" / "images"  # images in an images/ subfolder
    rng = np.random.default_rng(3)
    names = ["frame_10.png", "frame_2.png", "Frame_1.png", "frame_1b.jpg"]
    scene.mkdir(parents=True)
    for name in names:
        write_image(scene / name, rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    (scene / "notes.txt").write_text("not an image")
    data = DataParams(sources=[SourceParams(kind="images", root=str(tmp_path / "scenes"))],
                      val_fraction=0.0)
    build_manifest(data, tmp_path / "m.csv", tmp_path / "img")
    rows = sorted(read_manifest(tmp_path / "m.csv"), key=lambda r: r.frame)
    manifest_order = [Path(r.image).name for r in rows]
    (info,) = run_inference(tmp_path / "scenes" / "hall", checkpoint, tmp_path / "out", PARAMS)
    assert manifest_order == [Path(p).name for p in info["images"]]
    assert manifest_order == ["Frame_1.png", "frame_1b.jpg", "frame_2.png", "frame_10.png"]


class FixedPrediction(torch.nn.Module):
    """A "student" that returns given maps, so inference writes the poses of known maps."""

    patch_size = 14

    def __init__(self, pred):
        super().__init__()
        self.pred = {k: torch.from_numpy(np.asarray(v, np.float32))[None] for k, v in
                     pred.items()}

    def forward(self, images):
        return self.pred

    def forward_stream(self, images, device, dtype, sink, view_chunk, token_chunk):
        for start in range(0, len(images), view_chunk):
            sink(start, {k: v[0, start:start + view_chunk].numpy() for k, v in
                         self.pred.items()})


def test_inference_cameras_are_the_poses_evaluation_scores(tmp_path):
    from boxroom import camera, random_scene, render_view

    from distill3r.evaluation.poses import estimate_cameras, pose_metrics, relative_pose_errors
    from distill3r.evaluation.protocol import evaluate_sample, reference_from_gt
    from distill3r.inference import Scene, reconstruct_scene

    rng = np.random.default_rng(5)
    room = random_scene(rng)
    H = W = 28
    frames = [camera(rng, room, i, 4, H, W) for i in range(4)]
    views = [render_view(room, K, c2w, H, W) for K, c2w in frames]
    gt = {"depth": np.stack([d for _, d, _ in views]), "K": np.stack([k for k, _ in frames]),
          "c2w": np.stack([c for _, c in frames])}
    ref = reference_from_gt(**gt)
    noise = rng.normal(scale=0.01, size=ref["xyz_global"].shape)
    pred = {"xyz_global": ref["xyz_global"] + noise, "xyz_local": ref["xyz_local"],
            "conf_global": rng.uniform(1, 5, (4, H, W)), "conf_local": rng.uniform(1, 5, (4, H, W))}
    folder = tmp_path / "scene"
    for i, (rgb, _, _) in enumerate(views):
        write_image(folder / f"{i}.png", rgb)
    params = InferParams(size=W, device="cpu", dtype="fp32", preview_views=1)
    reconstruct_scene(FixedPrediction(pred), Scene("scene", sorted(folder.iterdir())),
                      tmp_path / "out", params, torch.device("cpu"))
    written = json.loads((tmp_path / "out" / "scene_cameras.json").read_text())["frames"]
    c2w = np.array([f["c2w"] for f in written])
    np.testing.assert_array_equal(c2w[0], np.eye(4))  # the global frame is view 0's camera
    assert written[0]["pose_method"] == "identity"
    stored = {"xyz_global": np.float16, "xyz_local": np.float16}  # the map store's dtypes
    pred32 = {k: np.asarray(v, np.float32).astype(stored.get(k, np.float32)).astype(np.float64)
              for k, v in pred.items()}
    keep, _ = confident_pixels(pred32["xyz_global"], pred32["conf_local"], 10.0)
    cams = estimate_cameras(pred32, keep, params.pnp_reprojection_px, params.seed)
    np.testing.assert_allclose(c2w, cams.c2w, atol=1e-6)
    full = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in pred.items()}
    unrounded = estimate_cameras(full, confident_pixels(full["xyz_global"], full["conf_local"],
                                                        10.0)[0], params.pnp_reprojection_px,
                                 params.seed)
    np.testing.assert_allclose(c2w, unrounded.c2w, atol=2e-3)  # float16 storage costs little
    # evaluation scores exactly these poses
    scores = evaluate_sample(pred32, gt, pnp_reprojection_px=params.pnp_reprojection_px,
                             seed=params.seed, conf_percentile=params.conf_percentile)
    expected = pose_metrics(*relative_pose_errors(c2w, ref["c2w"]))
    for key, value in expected.items():
        assert scores[f"pnp_{key}"] == pytest.approx(value, abs=1e-6), key
    assert scores["pnp_rra_15"] == 1.0  # 1 cm of noise at 28x28: the poses are close
