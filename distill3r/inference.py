"""Reconstruct scenes from folders of images with a trained student.

``run_inference(images_dir, checkpoint, output_dir, params)`` finds the scenes, loads the
student (``distill3r.models.load_student``) and writes per scene, into ``output_dir``:

- ``<scene>_student.ply``: global points (view 0's camera frame, OpenCV axes, the model's
  scale) whose local confidence is at or above the ``conf_percentile`` percentile, coloured
  from the input images;
- ``<scene>_cameras.json``: estimated ``K`` (shared, at the processed resolution) and ``c2w``
  per image from :func:`distill3r.evaluation.poses.estimate_cameras` (the recipe evaluation
  scores: focal from view 0's confident points, view 0 the identity, PnP-RANSAC for the
  others, Procrustes where PnP fails), in the layout of the demo scenes' ``cameras.json``;
- ``<scene>_info.json``: views, resolution, timings, points kept, checkpoint fingerprint;
- ``<scene>_preview.png``: a render of the cloud plus per-view depth and confidence.

Scene discovery: ``images_dir`` holding images is one scene named after the folder; a folder
with an ``rgb/`` or ``images/`` subfolder of images likewise; otherwise every subfolder that is
a scene is processed. Views are listed by :func:`distill3r.data.io.scene_images` (natural
file-name order), the rule of ``kind: images`` sources too, so view 0 is the same image. All
views of a scene are resized and centre-cropped (never stretched) to one size: long side
``size``, multiples of the model's patch size, the orientation of most images (ties: the first
image's).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from distill3r.config import InferParams
from distill3r.data.io import (IMAGE_SUBFOLDERS, IMAGE_SUFFIXES, is_image_file, natural_key,
                               read_image, scene_images)
from distill3r.data.view import fit_size, resize_crop
from distill3r.devices import autocast, resolve_device, resolve_dtype
from distill3r.evaluation.metrics import subsample_indices
from distill3r.evaluation.poses import confident_pixels, estimate_cameras
from distill3r.models.checkpoint import checkpoint_fingerprint
from distill3r.models.inputs import images_to_input
from distill3r.export import write_ply, write_preview
from distill3r.jsonio import write_json

log = logging.getLogger(__name__)


@dataclass
class Scene:
    """One scene to reconstruct: its name and image files (sorted; the first is view 0)."""

    name: str
    images: list[Path]


def _warn_skipped(paths: list[Path]) -> None:
    for p in paths:
        log.warning("%s: not an image (suffix not in %s), skipped", p, ", ".join(IMAGE_SUFFIXES))


def find_scenes(images_dir: str | Path) -> list[Scene]:
    """The scenes under ``images_dir`` (see the module docstring); ``ValueError`` if none."""
    root = Path(images_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: images folder not found")
    images, skipped = scene_images(root)
    _warn_skipped(skipped)
    if images:
        subdirs = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and p.name not in IMAGE_SUBFOLDERS]
        if subdirs and any(is_image_file(p) for p in root.iterdir()):
            log.warning("%s: holds images, so it is one scene; subfolders ignored: %s", root,
                        ", ".join(sorted(subdirs)))
        return [Scene(root.resolve().name, images)]
    scenes = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=natural_key):
        found, skipped = scene_images(sub)
        _warn_skipped(skipped)
        if found:
            scenes.append(Scene(sub.name, found))
        else:
            log.warning("%s: no images, skipped", sub)
    if not scenes:
        raise ValueError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files "
                         f"in the folder, in {'/ or '.join(IMAGE_SUBFOLDERS)}/, and in scene "
                         "subfolders)")
    return scenes


def _shrink(image: np.ndarray, min_side: int) -> np.ndarray:
    """Downscale very large images early (to twice what any crop needs) to bound memory."""
    h, w = image.shape[:2]
    if min(h, w) <= 2 * min_side:
        return image
    s = 2 * min_side / min(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))),
                      interpolation=cv2.INTER_AREA)


def load_views(paths: list[Path], size: int, multiple: int) -> tuple[np.ndarray, list]:
    """Read, resize and centre-crop images to one common size.

    Returns:
        ``(images [N,H,W,3] uint8, original sizes [(h, w), ...])``. ``ValueError`` naming the
        file for an unreadable image.
    """
    if not paths:
        raise ValueError("no images to load")
    raw, sizes = [], []
    for p in paths:
        img = read_image(p)
        sizes.append(img.shape[:2])
        raw.append(_shrink(img, size + multiple))
    portrait = [h > w for h, w in sizes]
    n_portrait = sum(portrait)
    if 2 * n_portrait == len(sizes):
        want_portrait = portrait[0]
    else:
        want_portrait = 2 * n_portrait > len(sizes)
    ref = next(i for i, p in enumerate(portrait) if p == want_portrait)
    H, W = fit_size(*sizes[ref], size, multiple)
    if 0 < n_portrait < len(sizes):
        log.warning("mixed portrait and landscape images: all are centre-cropped to %dx%d (HxW)",
                    H, W)
    images = np.stack([resize_crop(img, (H, W))[0] for img in raw])
    return images, sizes


def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device,
            dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Run the student on ``images [N,H,W,3]`` uint8 -> numpy float32 maps without batch
    axis: ``xyz_global, xyz_local [N,H,W,3]``, ``conf_global, conf_local [N,H,W]``."""
    x = images_to_input(torch.from_numpy(images).to(device))[None]
    with torch.inference_mode(), autocast(device, dtype):
        out = model(x)
    return {k: out[k][0].float().cpu().numpy() for k in
            ("xyz_global", "xyz_local", "conf_global", "conf_local")}


def select_points(xyz_global: np.ndarray, keep: np.ndarray, images: np.ndarray,
                  max_points: int | None = None, seed: int = 0):
    """The points of the ``keep`` pixels (see :func:`confident_pixels`), coloured.

    Args:
        xyz_global: ``[N,H,W,3]``; keep: ``[N,H,W]`` bool; images: ``[N,H,W,3]`` uint8.
        max_points: cap on the result (deterministic subset with ``seed``).
    Returns:
        ``(points [M,3] float32, colors [M,3] uint8, exported [N,H,W] bool)``.
    """
    idx = np.flatnonzero(keep)
    if max_points is not None and len(idx) > max_points:
        idx = idx[subsample_indices(len(idx), max_points, seed)]
        keep = np.zeros(keep.size, bool)
        keep[idx] = True
        keep = keep.reshape(xyz_global.shape[:3])
    points = xyz_global.reshape(-1, 3)[idx].astype(np.float32)
    colors = images.reshape(-1, 3)[idx]
    return points, colors, keep


def reconstruct_scene(model: torch.nn.Module, scene: Scene, output_dir: str | Path,
                      params: InferParams, device: torch.device,
                      checkpoint: str | Path | None = None) -> dict:
    """Reconstruct one scene and write its four outputs; returns the info dict."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    patch = int(getattr(model, "patch_size", 14))
    images, sizes = load_views(scene.images, params.size, patch)
    t1 = time.perf_counter()
    dtype = resolve_dtype(params.dtype, device)
    pred = predict(model, images, device, dtype)
    t2 = time.perf_counter()
    keep, threshold = confident_pixels(pred["xyz_global"], pred["conf_local"],
                                       params.conf_percentile)
    points, colors, _ = select_points(pred["xyz_global"], keep, images, params.max_points,
                                      params.seed)
    if len(points) == 0:
        raise ValueError(f"{scene.name}: the model predicted no finite points")
    cams = estimate_cameras(pred, keep, params.pnp_reprojection_px, params.seed)
    K, c2w, methods = cams.K, cams.c2w, cams.methods
    t3 = time.perf_counter()
    N, H, W = keep.shape
    files = {k: out / f"{scene.name}_{k}" for k in
             ("student.ply", "cameras.json", "info.json", "preview.png")}
    write_ply(files["student.ply"], points, colors)
    cameras = {"scene": scene.name, "width": W, "height": H,
               "note": "K at the processed resolution; c2w in view 0's camera frame, model scale",
               "frames": [{"frame": i, "image": p.name, "source_size": list(sizes[i]),
                           "K": K.tolist(), "c2w": c2w[i].tolist(), "pose_method": methods[i]}
                          for i, p in enumerate(scene.images)]}
    write_json(files["cameras.json"], cameras)
    write_preview(files["preview.png"], images, pred["xyz_local"][..., 2], pred["conf_local"],
                  points, colors, K, max_views=params.preview_views)
    t4 = time.perf_counter()
    config = getattr(model, "config", None)
    info = {
        "scene": scene.name, "views": N, "resolution": [H, W],
        "images": [str(p) for p in scene.images],
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_fingerprint": checkpoint and checkpoint_fingerprint(checkpoint),
        "model": getattr(config, "name", None), "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "conf_percentile": params.conf_percentile, "conf_threshold": threshold,
        "points_total": int(N * H * W), "points_kept": int(len(points)),
        "focal_px": float(K[0, 0]), "pose_methods": methods,
        "timings_s": {"load": t1 - t0, "forward": t2 - t1, "points_and_poses": t3 - t2,
                      "export": t4 - t3, "total": t4 - t0},
        "outputs": {k: str(v) for k, v in files.items()},
    }
    write_json(files["info.json"], info)
    return info


def run_inference(images_dir: str | Path, checkpoint: str | Path, output_dir: str | Path,
                  params: InferParams | None = None,
                  failures: list[tuple[str, str]] | None = None) -> list[dict]:
    """Find the scenes, load the student from ``checkpoint`` and reconstruct every scene.

    With a ``failures`` list, a scene whose input is bad (``ValueError``) is appended to it as
    ``(scene, message)`` and the other scenes still run; without one the error propagates."""
    params = params or InferParams()
    scenes = find_scenes(images_dir)  # fail on bad input before loading the model
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise ValueError(f"{ckpt}: checkpoint folder not found (expected model.safetensors "
                         "and config.json written by training)")
    from distill3r.models import load_student  # lazy: the model code is only needed here

    device = resolve_device(params.device)
    try:
        model = load_student(ckpt, device=device)
    except ValueError as exc:
        raise ValueError(f"cannot load the student from {ckpt}: {exc}") from exc
    infos = []
    for scene in scenes:
        log.info("%s: %d image(s)", scene.name, len(scene.images))
        try:
            infos.append(reconstruct_scene(model, scene, output_dir, params, device, ckpt))
        except ValueError as exc:
            if failures is None:
                raise
            log.error("%s: %s", scene.name, exc)
            failures.append((scene.name, str(exc)))
    return infos
