"""Benchmark fixtures: analytic box-room scenes written in each benchmark's published layout.

Frames are ray-cast (:mod:`boxroom`: exact depth, ``K`` and OpenCV ``c2w``) at a small size and
written the way each dataset stores them (file names, depth encoding and units, pose
convention). :class:`TruthModel` predicts the exact point maps from the rendered truth, never
from the files, so a reader that gets a convention wrong scores badly against it; optional
perturbations give a known pose or scale error.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from boxroom import camera, random_scene, render_view
from dataset_fixtures import TruthFrame, write_jpeg

from distill3r.benchmarks.models import BenchModel
from distill3r.benchmarks.readers import NRGBD_K, SEVEN_SCENES_K, _fixed_intrinsics
from distill3r.benchmarks.sample import BenchSample
from distill3r.data.io import write_depth_png, write_image
from distill3r.data.view import ViewTransform
from distill3r.geometry import depth_to_camera_points, transform_points

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])
H, W = 48, 64
Truth = dict  # {(scene name as the reader names it, frame label): TruthFrame}


def render_scenes(num_scenes: int, frames: int, K: np.ndarray | None, seed: int
                  ) -> list[list[TruthFrame]]:
    """Ray-cast scenes; ``K`` fixed for every frame (datasets with constant intrinsics) or
    None for one random focal per scene."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(num_scenes):
        scene = random_scene(rng)
        out = []
        for i in range(frames):
            Ki, c2w = camera(rng, scene, i, frames, H, W)
            if K is not None:
                Ki = K
            elif i == 0:  # one camera per scene with a centred principal point: what the
                Ki = Ki.copy()  # protocol's pose estimate assumes (shared focal, centre)
                Ki[:2, 2] = (W - 1) / 2, (H - 1) / 2
                scene_K = Ki
            else:
                Ki = scene_K
            rgb, depth, _ = render_view(scene, Ki, c2w, H, W)
            out.append(TruthFrame(i, rgb, depth.astype(np.float32), Ki, c2w))
        scenes.append(out)
    return scenes


def _mm_png(path: Path, depth_m: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_depth_png(path, depth_m, scale=1e-3)


def _gray_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image), path


def write_seven_scenes(root: Path, num_scenes=2, frames=6, pose="c2w", seed=0) -> Truth:
    """``<scene>/TestSplit.txt`` + ``seq-01/frame-NNNNNN.{color.png,depth.proj.png,pose.txt}``
    (depth mm; ``pose="w2c"`` writes the wrong convention)."""
    K = _fixed_intrinsics(*SEVEN_SCENES_K, (H, W))
    truth = {}
    for s, frames_ in enumerate(render_scenes(num_scenes, frames, K, seed)):
        scene = root / f"room{s}"
        seq = scene / "seq-01"
        seq.mkdir(parents=True)
        (scene / "TestSplit.txt").write_text("sequence1\n")
        for f in frames_:
            stem = seq / f"frame-{f.index:06d}"
            write_image(Path(f"{stem}.color.png"), f.image)
            _mm_png(Path(f"{stem}.depth.proj.png"), f.depth)
            np.savetxt(f"{stem}.pose.txt", f.c2w if pose == "c2w" else f.w2c)
            truth[(f"room{s}/seq-01", f"{f.index:06d}")] = f
    return truth


def write_nrgbd(root: Path, num_scenes=2, frames=6, gl=True, seed=1) -> Truth:
    """``<scene>/{images/img<i>.png, depth/depth<i>.png, poses.txt}`` (OpenGL c2w, mm depth;
    ``gl=False`` writes OpenCV poses: the wrong convention)."""
    K = _fixed_intrinsics(*NRGBD_K, (H, W))
    truth = {}
    for s, frames_ in enumerate(render_scenes(num_scenes, frames, K, seed)):
        scene = root / f"scene{s}"
        blocks = []
        for f in frames_:
            write_image(scene / "images" / f"img{f.index}.png", f.image)
            _mm_png(scene / "depth" / f"depth{f.index}.png", f.depth)
            pose = f.c2w @ GL_TO_CV if gl else f.c2w
            blocks.append("\n".join(" ".join(f"{v:.9f}" for v in row) for row in pose))
            truth[(f"scene{s}", str(f.index))] = f
        (scene / "poses.txt").write_text("\n".join(blocks) + "\n")
    return truth


def write_dtu(root: Path, num_scenes=1, frames=6, seed=2) -> Truth:
    """``<scan>/{images/NNNNNNNN.jpg, depths/NNNNNNNN.npy, binary_masks/NNNNNNNN.png,
    cams/NNNNNNNN_cam.txt}``, everything in millimetres (MVSNet world-to-camera)."""
    truth = {}
    for s, frames_ in enumerate(render_scenes(num_scenes, frames, None, seed)):
        scan = root / f"scan{s + 1}"
        for d in ("depths", "cams"):
            (scan / d).mkdir(parents=True, exist_ok=True)
        for f in frames_:
            stem = f"{f.index:08d}"
            write_jpeg(scan / "images" / f"{stem}.jpg", f.image)
            np.save(scan / "depths" / f"{stem}.npy", (f.depth * 1000).astype(np.float32))
            _gray_png(scan / "binary_masks" / f"{stem}.png", np.full((H, W), 255, np.uint8))
            w2c = f.w2c.copy()
            w2c[:3, 3] *= 1000
            text = ("extrinsic\n" + "\n".join(" ".join(f"{v:.9f}" for v in r) for r in w2c)
                    + "\n\nintrinsic\n" + "\n".join(" ".join(f"{v:.9f}" for v in r) for r in f.K)
                    + "\n\n425.0 2.5\n")
            (scan / "cams" / f"{stem}_cam.txt").write_text(text)
            truth[(f"scan{s + 1}", stem)] = f
    return truth


def write_co3d(root: Path, num_scenes=2, frames=6, seed=3) -> Truth:
    """dust3r's processed CO3D: ``selected_seqs_test.json`` and ``<cat>/<seq>/{images/
    frameNNNNNN.{jpg,npz}, depths/frameNNNNNN.jpg.geometric.png, masks/frameNNNNNN.png}``."""
    truth, selected = {}, {"hydrant": {}}
    for s, frames_ in enumerate(render_scenes(num_scenes, frames, None, seed)):
        seq = root / "hydrant" / f"{100 + s}_seq"
        numbers = []
        for f in frames_:
            n = f.index + 1
            numbers.append(n)
            write_jpeg(seq / "images" / f"frame{n:06d}.jpg", f.image)
            max_depth = float(f.depth.max())
            np.savez(seq / "images" / f"frame{n:06d}.npz", camera_pose=f.c2w.astype(np.float32),
                     camera_intrinsics=f.K.astype(np.float32), maximum_depth=np.float32(max_depth))
            depth_png = seq / "depths" / f"frame{n:06d}.jpg.geometric.png"
            depth_png.parent.mkdir(parents=True, exist_ok=True)
            write_depth_png(depth_png, f.depth, scale=max_depth / 65535.0)
            _gray_png(seq / "masks" / f"frame{n:06d}.png", np.full((H, W), 255, np.uint8))
            truth[(f"hydrant/{100 + s}_seq", f"{n:06d}")] = f
        selected["hydrant"][f"{100 + s}_seq"] = numbers
    (root / "selected_seqs_test.json").write_text(json.dumps(selected))
    return truth


def write_demo(root: Path, num_scenes=3, frames=5, seed=4) -> Truth:
    """The demo renderer's layout: ``<scene>/cameras.json`` with rgb/depth PNGs."""
    truth = {}
    for s, frames_ in enumerate(render_scenes(num_scenes, frames, None, seed)):
        scene = root / f"scene_{s:04d}"
        entries = []
        for f in frames_:
            write_image(scene / "rgb" / f"{f.index:06d}.png", f.image)
            write_depth_png(scene / "depth" / f"{f.index:06d}.png", f.depth)
            entries.append({"frame": f.index, "image": f"rgb/{f.index:06d}.png",
                            "depth": f"depth/{f.index:06d}.png", "K": f.K.tolist(),
                            "c2w": f.c2w.tolist()})
            truth[(f"scene_{s:04d}", str(f.index))] = f
        (scene / "cameras.json").write_text(json.dumps({"frames": entries}))
    return truth


WRITERS = {"sevenscenes": write_seven_scenes, "nrgbd": write_nrgbd, "dtu": write_dtu,
           "co3d": write_co3d, "demo": write_demo}


class TruthModel(BenchModel):
    """Exact point maps from the rendered truth at the sample's grid.

    ``rel_offset``: ``{view: 4x4}`` right-multiplied onto that view's pose relative to view 0
    (a motion in the view's own camera frame: a known pose error); ``scale``: every point
    times it (a known global scale error)."""

    name = "truth"

    def __init__(self, truth: Truth, rel_offset: dict[int, np.ndarray] | None = None,
                 scale: float = 1.0):
        self.truth, self.rel_offset, self.scale = truth, rel_offset or {}, scale

    def predict(self, sample: BenchSample) -> dict[str, np.ndarray]:
        frames = [self.truth[(sample.scene, label)] for label in sample.frames]
        w2c0 = frames[0].w2c
        local, glob = [], []
        for j, f in enumerate(frames):
            tf = ViewTransform.cover(f.depth.shape, sample.size)
            depth = tf.depth(f.depth).astype(np.float64)
            pts = depth_to_camera_points(depth, tf.intrinsics(f.K))
            pts[depth <= 0] = np.nan
            rel = (w2c0 @ f.c2w) @ self.rel_offset.get(j, np.eye(4))
            local.append(pts * self.scale)
            glob.append(transform_points(rel, pts) * self.scale)
        conf = np.ones(np.stack(local).shape[:3])
        return {"xyz_global": np.stack(glob), "xyz_local": np.stack(local),
                "conf_global": conf, "conf_local": conf.copy()}


def rotation_z(degrees: float) -> np.ndarray:
    """4x4 rotation about the z axis."""
    a = np.deg2rad(degrees)
    T = np.eye(4)
    T[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return T

