"""One scene's ``infer`` outputs, read for the viewer.

``infer`` writes, per scene, ``<scene>_student.ply`` (points with colour, local ``confidence``
and source ``view``), ``<scene>_cameras.json`` (shared ``K`` at the processed resolution,
``c2w`` per view in view 0's camera frame, OpenCV axes) and ``<scene>_info.json`` (among
others the input image paths). :func:`find_scene_files` resolves what the user names (the
output folder, a file of the scene, or its ``<folder>/<scene>`` prefix);
:func:`load_view_scene` reads them into a :class:`ViewScene`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from distill3r.data.io import read_image
from distill3r.data.view import resize_crop
from distill3r.export import read_ply_vertices
from distill3r.jsonio import read_json

log = logging.getLogger(__name__)

SUFFIXES = ("_student.ply", "_cameras.json", "_info.json", "_preview.png")


class ViewerInputError(ValueError):
    """What the viewer was given is not (complete) ``infer`` output; the message names it."""


@dataclass
class SceneFiles:
    """The files of one scene written by ``infer``."""

    name: str
    ply: Path
    cameras: Path
    info: Path


@dataclass
class ViewScene:
    """A scene ready to draw.

    Attributes:
        points: ``[M,3]`` float32, view 0's camera frame (OpenCV: x right, y down, z forward).
        colors: ``[M,3]`` uint8. confidence: ``[M]`` float32 local confidence.
        view: ``[M]`` int32 source view of each point.
        c2w: ``[N,4,4]`` camera-to-world per view. K: ``[3,3]`` at ``size``.
        size: processed ``(H, W)``. image_names: ``N`` file names.
        thumbnails: ``N`` entries, ``[h,w,3]`` uint8 or None where the image is not found.
        total_points: points in the PLY (``M`` is at most this: see ``max_points``).
        conf_percentile: the percentile ``infer`` already dropped below.
    """

    name: str
    points: np.ndarray
    colors: np.ndarray
    confidence: np.ndarray
    view: np.ndarray
    c2w: np.ndarray
    K: np.ndarray
    size: tuple[int, int]
    image_names: list[str]
    thumbnails: list[np.ndarray | None]
    total_points: int
    conf_percentile: float

    @property
    def num_views(self) -> int:
        return len(self.c2w)


def _files(folder: Path, name: str) -> SceneFiles:
    files = SceneFiles(name, *(folder / f"{name}{s}" for s in SUFFIXES[:3]))
    missing = [p.name for p in (files.ply, files.cameras, files.info) if not p.is_file()]
    if missing:
        raise ViewerInputError(f"{folder}: scene {name} lacks {', '.join(missing)} (run infer "
                               "on it again)")
    return files


def find_scene_files(path: str | Path, scene: str | None = None) -> SceneFiles:
    """The scene named by ``path``: an ``infer`` output folder (its only scene, or ``scene``),
    one of a scene's files, or the ``<folder>/<scene>`` prefix of them."""
    path = Path(path)
    if path.is_dir():
        names = sorted(p.name[:-len("_info.json")] for p in path.glob("*_info.json"))
        if scene is not None:
            if scene not in names:
                raise ViewerInputError(f"{path}: no scene {scene!r} (found: "
                                       f"{', '.join(names) or 'none'})")
            return _files(path, scene)
        if not names:
            raise ViewerInputError(f"{path}: no infer outputs (<scene>_info.json) found")
        if len(names) > 1:
            raise ViewerInputError(f"{path}: several scenes ({', '.join(names)}): name one "
                                   "with --scene")
        return _files(path, names[0])
    for suffix in SUFFIXES:
        if path.name.endswith(suffix):
            return _files(path.parent, path.name[:-len(suffix)])
    if path.parent.is_dir() and (path.parent / f"{path.name}_info.json").is_file():
        return _files(path.parent, path.name)
    raise ViewerInputError(f"{path}: neither an infer output folder nor a scene's output "
                           f"file (<scene>{', <scene>'.join(SUFFIXES)})")


def _thumbnail(path: Path, size: tuple[int, int], long_side: int) -> np.ndarray | None:
    """The input image cropped as ``infer`` did, then shrunk to ``long_side``; None (logged)
    when it cannot be read."""
    try:
        image = resize_crop(read_image(path), size)[0]
    except ValueError as exc:
        log.warning("%s: no image on its camera (%s)", path, exc)
        return None
    scale = long_side / max(size)
    if scale < 1:
        image = cv2.resize(image, (max(1, round(size[1] * scale)), max(1, round(size[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    return image


def _subsample(count: int, max_points: int | None, seed: int) -> np.ndarray | slice:
    if max_points is None or count <= max_points:
        return slice(None)
    return np.sort(np.random.default_rng(seed).choice(count, size=max_points, replace=False))


def load_view_scene(files: SceneFiles, max_points: int | None = None, thumbnail_side: int = 160,
                    seed: int = 0) -> ViewScene:
    """Read ``files`` (``ViewerInputError`` naming the file for what is missing or does not
    fit); at most ``max_points`` points (a uniform random subset for ``seed``)."""
    data = read_ply_vertices(files.ply)
    missing = [k for k in ("red", "green", "blue", "confidence", "view") if k not in data]
    if missing:
        raise ViewerInputError(f"{files.ply}: the points lack {', '.join(missing)} (written by an "
                               "older infer: run infer again)")
    cams = read_json(files.cameras, "cameras file")
    info = read_json(files.info, "info file")
    try:
        frames = cams["frames"]
        size = (int(cams["height"]), int(cams["width"]))
        K = np.asarray(frames[0]["K"], np.float64)
        c2w = np.asarray([f["c2w"] for f in frames], np.float64)
        names = [str(f["image"]) for f in frames]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ViewerInputError(f"{files.cameras}: not an infer cameras file ({exc!r})") from exc
    if K.shape != (3, 3) or c2w.shape != (len(frames), 4, 4):
        raise ViewerInputError(f"{files.cameras}: K {K.shape} / c2w {c2w.shape}, expected "
                               f"(3, 3) / ({len(frames)}, 4, 4)")
    view = data["view"].astype(np.int32)
    if len(view) and (view.min() < 0 or view.max() >= len(frames)):
        raise ViewerInputError(f"{files.ply}: point views {view.min()}..{view.max()} outside the "
                               f"{len(frames)} cameras of {files.cameras.name}")
    images = info.get("images") or []
    if len(images) != len(frames):
        log.warning("%s: %d image paths for %d cameras: frustums without images", files.info,
                    len(images), len(frames))
        images = [None] * len(frames)
    keep = _subsample(len(view), max_points, seed)
    points = np.stack([data["x"], data["y"], data["z"]], axis=1)[keep].astype(np.float32)
    colors = np.stack([data["red"], data["green"], data["blue"]], axis=1)[keep].astype(np.uint8)
    return ViewScene(
        name=files.name, points=points, colors=colors,
        confidence=data["confidence"][keep].astype(np.float32), view=view[keep], c2w=c2w, K=K,
        size=size, image_names=names,
        thumbnails=[None if p is None else _thumbnail(Path(p), size, thumbnail_side)
                    for p in images],
        total_points=len(view), conf_percentile=float(info.get("conf_percentile", 0.0)))


def confidence_threshold(confidence: np.ndarray, percentile: float) -> float:
    """The confidence at ``percentile`` (0-100, numpy's linear method) of ``confidence``;
    ``-inf`` at 0 (every point) or for no points."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"confidence percentile must be in [0, 100], got {percentile}")
    if percentile == 0 or len(confidence) == 0:
        return -np.inf
    return float(np.percentile(confidence, percentile))
