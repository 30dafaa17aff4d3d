"""One reconstruction as a COLMAP sparse model that COLMAP, pycolmap, nerfstudio and gsplat
read as they are.

Layout of the export folder (COLMAP's own, and what the readers look for by default or with
one option: gsplat's ``examples/datasets/colmap.py`` opens ``<data>/sparse/0`` and
``<data>/images``; nerfstudio's ``colmap_dataparser.py`` takes ``--colmap-path sparse/0`` and
``images`` by default)::

    images/<name>           the source images, at their own size
    sparse/0/cameras.bin    one PINHOLE camera per source image size
    sparse/0/images.bin     one image per view, view order (image id = view + 1)
    sparse/0/points3D.bin   the exported points, each with its source pixel as its track

The three files are COLMAP's binary model (layout in :mod:`distill3r.data.colmap_model`;
upstream ``colmap/src/colmap/scene/reconstruction_io_binary.cc``). Without ``rigs.bin`` and
``frames.bin`` COLMAP 3.12+/4.x read them as a legacy model with one rig per camera and one
frame per image (``ReadImagesBinary``: ``CreateOneRigPerCamera``), and earlier COLMAP 3.x
read exactly these three files.

Geometry: world = view 0's camera frame at the model's scale (OpenCV axes); an image's pose is
COLMAP's world-to-camera ``(qw, qx, qy, qz, tx, ty, tz)``. Intrinsics are the model-resolution
``K`` mapped back to each source image through its :class:`~distill3r.data.view.ViewChain`
(crop and resize undone; ``fx`` and ``fy`` can differ by the crop's rounding, hence PINHOLE),
with COLMAP's pixel convention (top-left pixel centre at ``(0.5, 0.5)``).

Points: every exported point comes from one pixel of one view; it is written on that pixel's
viewing ray at its depth in that camera (the predicted global point moved perpendicular to the
ray, so points and cameras agree: it reprojects into its source pixel), points behind their
camera are dropped. Its track is that one observation (image id, index into the image's
``points2D``, whose ``point3D_id`` names it back); ``error`` is its reprojection error in
source pixels.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from distill3r.atomic import replace_dir
from distill3r.data.colmap_model import pose_from_c2w
from distill3r.data.io import read_image
from distill3r.data.view import ViewChain
from distill3r.geometry import invert_pose

SPARSE = Path("sparse") / "0"
PINHOLE_ID = 1  # COLMAP CameraModelId PINHOLE: fx, fy, cx, cy
COPY_SUFFIXES = (".png", ".jpg", ".jpeg")  # written as they are: every reader decodes them

# points3D.bin record of a point with a one-observation track (packed, little-endian)
_POINT = np.dtype([("id", "<u8"), ("xyz", "<f8", (3,)), ("rgb", "u1", (3,)), ("error", "<f8"),
                   ("track_length", "<u8"), ("image_id", "<u4"), ("point2d_idx", "<u4")])
_OBS = np.dtype([("xy", "<f8", (2,)), ("point3d_id", "<u8")])  # images.bin points2D record

# per view i: (flat pixel indices [m] at the model resolution, global points [m,3], rgb [m,3])
PointSource = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class ExportView:
    """One view to export: its source image file and the chain that made the model input."""

    path: Path
    chain: ViewChain


def colmap_params(K_source: np.ndarray) -> np.ndarray:
    """PINHOLE ``fx, fy, cx, cy`` of a project ``K`` (pixel centres at integers): COLMAP puts
    the top-left pixel's centre at ``(0.5, 0.5)`` (colmap.github.io/cameras.html)."""
    K = np.asarray(K_source, np.float64)
    return np.array([K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5])


def on_rays(points: np.ndarray, pixels_uv: np.ndarray, K: np.ndarray, c2w: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Points moved onto their pixels' viewing rays at their own depth in the camera.

    Args:
        points: ``[m,3]`` world points; pixels_uv: ``[m,2]`` their pixels (model resolution);
        K: ``[3,3]``; c2w: ``[4,4]`` the camera.
    Returns:
        ``(moved [m,3] float64, depth [m])``; depth <= 0: behind the camera.
    """
    w2c = invert_pose(np.asarray(c2w, np.float64))
    cam = np.asarray(points, np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    depth = cam[:, 2]
    Kinv = np.linalg.inv(np.asarray(K, np.float64))
    rays = np.concatenate([pixels_uv, np.ones((len(pixels_uv), 1))], 1) @ Kinv.T
    moved_cam = rays * depth[:, None]
    return (moved_cam - w2c[:3, 3]) @ w2c[:3, :3], depth


def reprojection_px(points: np.ndarray, xy: np.ndarray, K_source: np.ndarray,
                    w2c: np.ndarray) -> np.ndarray:
    """Distance (pixels) of ``points [m,3]`` projected by ``K_source``/``w2c`` from their
    project-convention source pixels ``xy [m,2]``."""
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    proj = cam @ np.asarray(K_source, np.float64).T
    uv = proj[:, :2] / proj[:, 2:3]
    return np.linalg.norm(uv - xy, axis=1)


def export_image(src: Path, dst_dir: Path) -> str:
    """Put the source image into ``dst_dir`` as the readers will decode it; returns its name
    there. A PNG/JPEG whose raw pixels are what the project decoded (no EXIF rotation) is
    copied byte for byte; anything else is written as ``<name>.png`` from the decoded pixels."""
    decoded = read_image(src)
    if src.suffix.lower() in COPY_SUFFIXES:
        raw = cv2.imdecode(np.fromfile(str(src), np.uint8),
                           cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if raw is not None and np.array_equal(cv2.cvtColor(raw, cv2.COLOR_BGR2RGB), decoded):
            shutil.copyfile(src, dst_dir / src.name)
            return src.name
    name = src.name + ".png"
    if not cv2.imwrite(str(dst_dir / name), cv2.cvtColor(decoded, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"{dst_dir / name}: could not write image")
    return name


def _cameras(views: list[ExportView], K: np.ndarray) -> tuple[bytes, list[int]]:
    """cameras.bin (one PINHOLE camera per source size, ids from 1) and each view's id."""
    by_size: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
    ids = []
    for view in views:
        hw = tuple(view.chain.src_hw)
        if hw not in by_size:
            by_size[hw] = (len(by_size) + 1, colmap_params(view.chain.source_intrinsics(K)))
        ids.append(by_size[hw][0])
    out = [struct.pack("<Q", len(by_size))]
    for (h, w), (cam_id, params) in by_size.items():
        out.append(struct.pack("<IiQQ", cam_id, PINHOLE_ID, w, h) + params.astype("<f8").tobytes())
    return b"".join(out), ids


def write_colmap(folder: str | Path, views: list[ExportView], K: np.ndarray, c2w: np.ndarray,
                 points: PointSource) -> dict:
    """Write the export folder (module docstring) for ``views`` with the model-resolution
    ``K [3,3]``, poses ``c2w [N,4,4]`` (view 0's frame) and ``points(i)`` per view; the
    folder is built beside ``folder`` and swapped in whole. Returns a summary dict."""
    folder = Path(folder)
    H, W = views[0].chain.out_hw
    if len(c2w) != len(views):
        raise ValueError(f"{folder}: {len(c2w)} poses for {len(views)} views")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / SPARSE).mkdir(parents=True)
    (tmp / "images").mkdir()
    try:
        summary = _write(tmp, views, np.asarray(K, np.float64), np.asarray(c2w, np.float64),
                         points, (H, W))
        old = replace_dir(tmp, folder, folder.with_name(f".{folder.name}.old"))
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _write(root: Path, views: list[ExportView], K: np.ndarray, c2w: np.ndarray,
           points: PointSource, hw: tuple[int, int]) -> dict:
    cameras, camera_ids = _cameras(views, K)
    (root / SPARSE / "cameras.bin").write_bytes(cameras)
    next_id, dropped, errors = 1, 0, []
    with open(root / SPARSE / "images.bin", "wb") as fi, \
            open(root / SPARSE / "points3D.bin", "wb") as fp:
        fi.write(struct.pack("<Q", len(views)))
        fp.write(struct.pack("<Q", 0))  # the count, rewritten at the end
        for i, view in enumerate(views):
            if view.chain.out_hw != hw:
                raise ValueError(f"{view.path}: model input {view.chain.out_hw}, expected {hw}")
            name = export_image(view.path, root / "images")
            qvec, tvec = pose_from_c2w(c2w[i])
            pix, xyz, rgb = points(i)
            u, v = (pix % hw[1]).astype(np.float64), (pix // hw[1]).astype(np.float64)
            moved, depth = on_rays(xyz, np.stack([u, v], 1), K, c2w[i])
            ok = (depth > 0) & np.isfinite(moved).all(1)
            dropped += int((~ok).sum())
            moved, u, v, rgb = moved[ok], u[ok], v[ok], np.asarray(rgb)[ok]
            x, y = view.chain.to_source(u, v)
            xy = np.stack([x, y], 1)
            err = reprojection_px(moved, xy, view.chain.source_intrinsics(K), invert_pose(c2w[i]))
            m = len(moved)
            ids = np.arange(next_id, next_id + m, dtype=np.uint64)
            obs = np.zeros(m, _OBS)
            obs["xy"], obs["point3d_id"] = xy + 0.5, ids  # COLMAP pixel convention
            fi.write(struct.pack("<I7dI", i + 1, *qvec, *tvec, camera_ids[i]))
            fi.write(name.encode("utf-8") + b"\0" + struct.pack("<Q", m) + obs.tobytes())
            rec = np.zeros(m, _POINT)
            rec["id"], rec["xyz"], rec["rgb"], rec["error"] = ids, moved, rgb, err
            rec["track_length"], rec["image_id"], rec["point2d_idx"] = 1, i + 1, np.arange(m)
            fp.write(rec.tobytes())
            next_id += m
            errors.append(err)
        fp.seek(0)
        fp.write(struct.pack("<Q", next_id - 1))
    err = np.concatenate(errors) if errors else np.zeros(0)
    return {"images": len(views), "cameras": int(max(camera_ids)), "points": next_id - 1,
            "points_behind_camera": dropped,
            "max_reprojection_px": float(err.max()) if len(err) else 0.0}
