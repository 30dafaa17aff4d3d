"""Readers of the benchmarks in their published layouts -> :class:`BenchScene` lists.

Every reader returns scenes in a stable (sorted) order with frames in capture order, and
frames that load ``(rgb uint8 [h,w,3], depth float32 [h,w] (0 invalid), K [3,3], c2w [4,4]
OpenCV camera-to-world)``. Depth is in the benchmark's own units (metres; DTU millimetres).
Bad files raise ``ValueError`` naming the file. Layouts and constants are those Spann3R's and
Fast3R's evaluation datasets read (cited per reader).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from distill3r.benchmarks.sample import BenchFrame, BenchScene
from distill3r.data.io import read_depth_png, read_image, _imread_unchanged
from distill3r.data.sources.simple import DemoSource
from distill3r.data.view import ViewTransform
from distill3r.geometry import invert_pose

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ValueError(f"{path}: {what} folder not found")
    return path


def _read_matrix(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        m = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable {shape[0]}x{shape[1]} matrix: {exc}") from exc
    if m.shape != shape or not np.isfinite(m).all():
        raise ValueError(f"{path}: expected a finite {shape[0]}x{shape[1]} matrix, got {m.shape}")
    return m


def _mm_depth(path: Path, max_m: float = 10.0) -> np.ndarray:
    """A 16-bit millimetre depth PNG as metres; 65535, > ``max_m`` and < 1 mm are invalid
    (Spann3R ``seven_scenes.py`` / ``nrgbd.py`` ``_get_views``)."""
    raw = _imread_unchanged(path)
    if raw is None or raw.ndim != 2 or raw.dtype != np.uint16:
        raise ValueError(f"{path}: not a single-channel 16-bit depth PNG")
    depth = np.where(raw == 65535, 0, raw).astype(np.float32) / 1000.0
    depth[(depth > max_m) | (depth < 1e-3)] = 0
    return depth


def _mask(path: Path) -> np.ndarray:
    """A mask image as float32 ``[h,w]`` in [0, 1] (the first channel of a colour file)."""
    raw = _imread_unchanged(path)
    if raw is None:
        raise ValueError(f"{path}: mask not readable")
    raw = raw.reshape(raw.shape[:2] + (-1,))[..., 0]
    return raw.astype(np.float32) / float(np.iinfo(raw.dtype).max if raw.dtype.kind == "u"
                                          else 1.0)


def _fixed_intrinsics(fx: float, fy: float, cx: float, cy: float, hw: tuple[int, int],
                      ref_hw: tuple[int, int] = (480, 640)) -> np.ndarray:
    """The dataset's fixed ``K`` of ``ref_hw`` frames, carried to frames of size ``hw`` by
    the same rule as any resize (identity for the published 640x480 frames)."""
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    if tuple(hw) == tuple(ref_hw):
        return K
    return ViewTransform(tuple(ref_hw), (0, 0, ref_hw[1], ref_hw[0]), tuple(hw)).intrinsics(K)


def _rgb_at(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Upstream resizes the colour image to the depth map's size (same field of view)."""
    if rgb.shape[:2] == tuple(hw):
        return rgb
    return cv2.resize(rgb, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------------------------------------
# 7-Scenes (Spann3R/Fast3R's "7_scenes_processed", SimpleRecon's depth.proj)
# ---------------------------------------------------------------------------------------------
# HengyiWang/spann3r spann3r/datasets/seven_scenes.py: "Intrinsics used in SimpleRecon"
SEVEN_SCENES_K = (525.0, 525.0, 320.0, 240.0)


def seven_scenes(root: str | Path, split: str = "test") -> list[BenchScene]:
    """``<root>/<scene>/{TestSplit,TrainSplit}.txt`` (lines ``sequenceN``) and
    ``<root>/<scene>/seq-NN/frame-XXXXXX.{color.png, depth.proj.png, pose.txt}``.

    Depth: uint16 mm; pose: camera-to-world 4x4 text (Spann3R ``SevenScenes._get_views``);
    K fixed (525, 525, 320, 240). Scene names ``<scene>/seq-NN``."""
    root = _need_dir(Path(root), "7-Scenes")
    split_file = {"train": "TrainSplit.txt", "test": "TestSplit.txt"}[split]
    scenes = []
    for scene_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        listing = scene_dir / split_file
        if not listing.is_file():
            raise ValueError(f"{listing}: split file not found (7-Scenes layout)")
        for line in listing.read_text().split():
            digits = "".join(c for c in line if c.isdigit())
            if not digits:
                raise ValueError(f"{listing}: {line!r} names no sequence number")
            seq = f"seq-{int(digits):02d}"
            seq_dir = _need_dir(scene_dir / seq, "7-Scenes sequence")
            count = len(list(seq_dir.glob("frame-*.color.png")))
            frames = [BenchFrame(f"{i:06d}", _seven_scenes_loader(seq_dir, i))
                      for i in range(count)]
            scenes.append(BenchScene(f"{scene_dir.name}/{seq}", frames))
    return scenes


def _seven_scenes_loader(seq_dir: Path, i: int):
    def load():
        stem = seq_dir / f"frame-{i:06d}"
        depth = _mm_depth(Path(f"{stem}.depth.proj.png"))
        rgb = _rgb_at(read_image(Path(f"{stem}.color.png")), depth.shape)
        K = _fixed_intrinsics(*SEVEN_SCENES_K, depth.shape)
        return rgb, depth, K, _read_matrix(Path(f"{stem}.pose.txt"), (4, 4))
    return load


# ---------------------------------------------------------------------------------------------
# Neural RGB-D (NRGBD)
# ---------------------------------------------------------------------------------------------
# HengyiWang/spann3r spann3r/datasets/nrgbd.py NRGBD._get_views
NRGBD_K = (554.2562584220408, 554.2562584220408, 320.0, 240.0)


def nrgbd_poses(path: Path) -> list[np.ndarray | None]:
    """``poses.txt``: 4 lines per frame, OpenGL camera-to-world; a block containing ``nan``
    is an invalid frame (None). Returned as OpenCV c2w (columns 1 and 2 negated)."""
    if not path.is_file():
        raise ValueError(f"{path}: poses file not found (NRGBD layout)")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if len(lines) % 4:
        raise ValueError(f"{path}: {len(lines)} lines is not 4 per frame")
    poses: list[np.ndarray | None] = []
    for b in range(0, len(lines), 4):
        block = lines[b:b + 4]
        if any("nan" in ln.lower() for ln in block):
            poses.append(None)
            continue
        try:
            m = np.array([[float(x) for x in ln.split()] for ln in block], np.float64)
        except ValueError as exc:
            raise ValueError(f"{path}: line {b + 1}: not numbers: {exc}") from exc
        if m.shape != (4, 4):
            raise ValueError(f"{path}: line {b + 1}: expected a 4x4 block")
        poses.append(m @ GL_TO_CV)
    return poses


def nrgbd(root: str | Path) -> list[BenchScene]:
    """``<root>/<scene>/{images/img<i>.png, depth/depth<i>.png, poses.txt}``; every scene
    folder is a test scene. Depth uint16 mm; K fixed; frames with NaN poses are dropped."""
    root = _need_dir(Path(root), "NRGBD")
    scenes = []
    for scene_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        poses = nrgbd_poses(scene_dir / "poses.txt")
        count = len(list(_need_dir(scene_dir / "images", "NRGBD images").glob("img*.png")))
        if count > len(poses):
            raise ValueError(f"{scene_dir / 'poses.txt'}: {len(poses)} poses for {count} images")
        frames = [BenchFrame(str(i), _nrgbd_loader(scene_dir, i, poses[i]))
                  for i in range(count) if poses[i] is not None]
        scenes.append(BenchScene(scene_dir.name, frames))
    return scenes


def _nrgbd_loader(scene_dir: Path, i: int, c2w: np.ndarray):
    def load():
        depth = _mm_depth(scene_dir / "depth" / f"depth{i}.png")
        rgb = _rgb_at(read_image(scene_dir / "images" / f"img{i}.png"), depth.shape)
        return rgb, depth, _fixed_intrinsics(*NRGBD_K, depth.shape), c2w
    return load


# ---------------------------------------------------------------------------------------------
# DTU (the MVSNet test release as Spann3R reads it)
# ---------------------------------------------------------------------------------------------
def read_mvsnet_cam(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """MVSNet ``*_cam.txt``: ``extrinsic`` + 4x4 world-to-camera, ``intrinsic`` + 3x3, then
    depth range numbers (Spann3R ``DTU.load_cam_mvsnet``). Returns ``(K, c2w)``."""
    try:
        words = path.read_text().split()
        ext = np.array([float(w) for w in words[1:17]], np.float64).reshape(4, 4)
        K = np.array([float(w) for w in words[18:27]], np.float64).reshape(3, 3)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not an MVSNet camera file: {exc}") from exc
    if words[0] != "extrinsic" or words[17] != "intrinsic":
        raise ValueError(f"{path}: expected 'extrinsic' and 'intrinsic' sections")
    return K, invert_pose(ext)


def dtu(root: str | Path) -> list[BenchScene]:
    """``<root>/<scan>/{images/NNNNNNNN.jpg, depths/NNNNNNNN.npy, binary_masks/NNNNNNNN.png,
    cams/NNNNNNNN_cam.txt}``. Depth ``.npy`` in mm, multiplied by the binary mask eroded with a
    10x10 kernel (Spann3R ``DTU._get_views``); frames in file-name order."""
    root = _need_dir(Path(root), "DTU")
    scenes = []
    for scan in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(_need_dir(scan / "images", "DTU images").glob("*.jpg"))
        scenes.append(BenchScene(scan.name, [BenchFrame(p.stem, _dtu_loader(scan, p.stem))
                                             for p in images]))
    return scenes


def _dtu_loader(scan: Path, stem: str):
    def load():
        path = scan / "depths" / f"{stem}.npy"
        try:
            depth = np.nan_to_num(np.load(path, allow_pickle=False).astype(np.float32))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable depth array: {exc}") from exc
        mask = _mask(scan / "binary_masks" / f"{stem}.png") > 0.5
        mask = cv2.resize(mask.astype(np.float32), (depth.shape[1], depth.shape[0]),
                          interpolation=cv2.INTER_NEAREST)
        depth = depth * cv2.erode(mask, np.ones((10, 10), np.uint8), iterations=1)
        rgb = read_image(scan / "images" / f"{stem}.jpg")
        if rgb.shape[:2] != depth.shape:
            raise ValueError(f"{path}: depth {depth.shape} differs from the image "
                             f"{rgb.shape[:2]}")
        K, c2w = read_mvsnet_cam(scan / "cams" / f"{stem}_cam.txt")
        return rgb, depth.astype(np.float32), K, c2w
    return load


# ---------------------------------------------------------------------------------------------
# CO3Dv2 (dust3r's preprocessed layout, as Fast3R's Co3d_Multiview reads it)
# ---------------------------------------------------------------------------------------------
def co3d(root: str | Path, split: str = "test", categories: list[str] | None = None
         ) -> list[BenchScene]:
    """``<root>/selected_seqs_<split>.json`` (``{category: {sequence: [frame numbers]}}``) and
    ``<root>/<category>/<sequence>/{images/frameNNNNNN.{jpg,npz}, depths/frameNNNNNN.jpg.
    geometric.png, masks/frameNNNNNN.png}``; the ``.npz`` holds ``camera_pose`` (OpenCV c2w),
    ``camera_intrinsics`` and ``maximum_depth``; depth = png / 65535 * maximum_depth, times the
    foreground mask (``mask / 255 > 0.1``) (facebookresearch/fast3r ``Co3d_Multiview.
    _load_view_data``, ``mask_bg=True``). Scene names ``<category>/<sequence>``."""
    root = _need_dir(Path(root), "CO3D")
    listing = root / f"selected_seqs_{split}.json"
    try:
        selected = json.loads(listing.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{listing}: not a readable sequence list: {exc}") from exc
    scenes = []
    for cat in sorted(selected):
        if categories and cat not in categories:
            continue
        for seq in sorted(selected[cat]):
            numbers = [int(n) for n in selected[cat][seq]]
            if numbers:
                folder = root / cat / seq
                scenes.append(BenchScene(f"{cat}/{seq}", [
                    BenchFrame(f"{n:06d}", _co3d_loader(folder, n)) for n in numbers]))
    return scenes


def _co3d_loader(folder: Path, n: int):
    def load():
        image = folder / "images" / f"frame{n:06d}.jpg"
        meta = image.with_suffix(".npz")
        try:
            with np.load(meta, allow_pickle=False) as z:
                c2w = np.asarray(z["camera_pose"], np.float64)
                K = np.asarray(z["camera_intrinsics"], np.float64)
                max_depth = float(np.nan_to_num(z["maximum_depth"]))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{meta}: not a CO3D camera file: {exc}") from exc
        depth_path = folder / "depths" / f"frame{n:06d}.jpg.geometric.png"
        depth = read_depth_png(depth_path, max_depth / 65535.0, str(folder))
        mask_path = folder / "masks" / f"frame{n:06d}.png"
        mask = _mask(mask_path)
        if mask.shape != depth.shape:
            raise ValueError(f"{mask_path}: mask {mask.shape} differs from the depth "
                             f"{depth.shape}")
        depth = depth * (mask > 0.1)
        return read_image(image), depth.astype(np.float32), K, c2w
    return load


# ---------------------------------------------------------------------------------------------
# The built-in demo scenes
# ---------------------------------------------------------------------------------------------
def demo(root: str | Path) -> list[BenchScene]:
    """The demo renders (``<root>/<scene>/cameras.json``, read by the demo source)."""
    source = DemoSource(str(root))
    scenes = []
    for ref in source.find_scenes():
        scene = source.read_scene(ref)
        frames = sorted(scene.frames, key=lambda f: f.frame)
        scenes.append(BenchScene(scene.name, [
            BenchFrame(str(f.frame), _demo_loader(source, f)) for f in frames]))
    return scenes


def _demo_loader(source: DemoSource, frame):
    def load():
        return read_image(frame.image), source.read_depth(frame), frame.K, frame.c2w
    return load

