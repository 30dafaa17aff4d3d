"""Habitat-Sim renders in the layout DUSt3R's multi-view habitat generator writes.

Layout (scene folders at any depth under the root)::

    <root>/
    └── <scene_dataset>/                      e.g. hm3d, gibson, mp3d, replica, scannet
        └── <scene_id>/                       one scene = one folder holding views
            ├── metadata.json                 (ignored)
            ├── 00000000_1.jpeg               view 1 of group 00000000 (.jpg/.png accepted)
            ├── 00000000_1_depth.exr          z-depth, metres
            ├── 00000000_1_camera_params.json intrinsics + camera-to-world (or .npz)
            ├── 00000000_2.jpeg ...           views of one group were rendered together
            └── 00000001_1.jpeg ...           around one location and overlap

A folder is a scene when it directly holds a ``*_depth.exr`` or ``*_camera_params.*`` file;
its views are the images named ``<key>_<view>.<jpeg|jpg|png>`` (``view`` an integer). The
scene's name is its path relative to the root with ``/`` replaced by ``_`` (the root's own
name if the root itself holds views).

Camera parameters (``.json``, or ``.npz`` read with ``allow_pickle=False``, same keys):
``camera_intrinsics`` 3x3 pixels, ``R_cam2world`` 3x3 and ``t_cam2world`` 3, already in
OpenCV camera axes (x right, y down, z forward): the generator turns Habitat's OpenGL-style
camera into OpenCV before writing (``R_cam2world = R_habitat @ R_opencv_to_habitat``), so
``c2w = [R t; 0 1]`` as stored. ``K``: the generator writes ``cx = W/2, cy = H/2`` for
Habitat's symmetric frustum, i.e. the principal point with pixel *corners* at integer
coordinates; the project puts pixel centres at integers, so 0.5 is subtracted from ``cx``
and ``cy`` (option ``pixel_corner_intrinsics``, default true; false takes ``K`` as written).

Depth: ``<key>_<view>_depth.exr``, one channel (any name; with several channels the one named
Z, depth or Y is used), float16 or float32 z-depth in metres; 0, negative or non-finite =
invalid. The source converts it (``native_depth`` is False) with the OpenEXR bindings.

Frame order: by group key (numerically when all digits), then view number, so each group's
views are contiguous neighbours in the frame order.

Skipped scenes (reason names the file): a view without its camera parameters or depth file
(unless ``drop_incomplete_views``, which drops that view with a warning instead), unreadable
camera parameters (corrupt or truncated ``.npz``, a bare ``.npy`` under that name, invalid
JSON) or malformed ones (missing keys, wrong shapes, numbers beyond float64, ``R_cam2world``
not a rotation), an unreadable EXR or one whose size differs from the image's (the manifest
builder).

Options: ``drop_incomplete_views`` (false), ``pixel_corner_intrinsics`` (true).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill3r.data.io import valid_depth
from distill3r.data.sources.base import (Frame, Scene, SceneRef, Source, check_rotation,
                                         register_source, rigid)

_VIEW = re.compile(r"^(?P<key>.+)_(?P<view>\d+)\.(?:jpeg|jpg|png)$", re.IGNORECASE)
_MARKERS = ("_depth.exr", "_camera_params.json", "_camera_params.npz")
_CAMERA_KEYS = {"camera_intrinsics": (3, 3), "R_cam2world": (3, 3), "t_cam2world": (3,)}
_DEPTH_CHANNELS = ("z", "depth", "y")  # preferred when an EXR holds several channels


@dataclass
class HabitatOptions:
    drop_incomplete_views: bool = False  # true: drop a view missing camera/depth, warn
    pixel_corner_intrinsics: bool = True  # K written with pixel corners at integers


def _load_npz(path: Path) -> dict:
    """The arrays of an ``.npz`` file (``allow_pickle=False``: object arrays raise)."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
        raise ValueError("not an .npz archive")
    with data:
        return {key: data[key] for key in data.files}


def _camera_values(path: Path, scene: str) -> dict:
    try:
        values = _load_npz(path) if path.suffix == ".npz" else json.loads(path.read_text())
    # bad zip (CRC, truncated), corrupt deflate member, empty file, bad UTF-8 or JSON, JSON
    # nested deeper than the parser's recursion limit
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error,
            RecursionError) as exc:
        raise ValueError(f"{path}: unreadable camera parameters: {exc} (scene {scene})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{path}: camera parameters must be an object (scene {scene})")
    return values


def read_camera(path: Path, scene: str, pixel_corners: bool = True,
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(K [3,3], c2w [4,4])`` OpenCV from a camera parameters file; ``ValueError`` if
    malformed."""
    values = _camera_values(path, scene)
    arrays = {}
    for key, shape in _CAMERA_KEYS.items():
        if key not in values:
            raise ValueError(f"{path}: camera parameters lack {key!r} (scene {scene})")
        try:
            arrays[key] = np.asarray(values[key], np.float64).reshape(shape)
        except (ValueError, TypeError, OverflowError) as exc:  # overflow: beyond float64
            raise ValueError(f"{path}: {key} must be {shape} numbers (scene {scene})") from exc
        if not np.all(np.isfinite(arrays[key])):
            raise ValueError(f"{path}: {key} is not finite (scene {scene})")
    K = arrays["camera_intrinsics"].copy()
    R = check_rotation(arrays["R_cam2world"], f"{path}: R_cam2world of scene {scene}", atol=1e-3)
    if not np.allclose(K[2], [0, 0, 1], atol=1e-6):
        raise ValueError(f"{path}: camera_intrinsics' last row must be 0 0 1 (scene {scene})")
    if pixel_corners:
        K[:2, 2] -= 0.5
    return K, rigid(R, arrays["t_cam2world"])


def read_exr_depth(path: Path) -> np.ndarray:
    """The depth channel of an EXR file as ``[H,W]`` float32 (raw values); ``ValueError``
    naming the file if it is unreadable or holds no single depth channel."""
    import OpenEXR  # only sources reading EXR need the bindings

    try:
        channels = OpenEXR.File(str(path)).channels()
    except (RuntimeError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable EXR file: {exc}") from exc
    planes = {name: np.asarray(ch.pixels) for name, ch in channels.items()}
    planes = {name: p[..., 0] if p.ndim == 3 and p.shape[2] == 1 else p
              for name, p in planes.items()}
    names = [n for n, p in planes.items() if p.ndim == 2]
    if len(planes) == 1 and names:
        return planes[names[0]].astype(np.float32)
    for wanted in _DEPTH_CHANNELS:
        for name in names:
            if name.lower() == wanted or name.lower().endswith("." + wanted):
                return planes[name].astype(np.float32)
    raise ValueError(f"{path}: no depth channel among {sorted(planes)} (expected one channel, "
                     f"or one named Z, depth or Y)")


def _group_key(key: str) -> tuple:
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


@register_source
class HabitatSource(Source):
    """Habitat renders written by DUSt3R's generator; see the module docstring."""

    kind = "habitat"
    native_depth = False
    Options = HabitatOptions

    def find_scenes(self) -> list[SceneRef]:
        refs = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if any(f.endswith(_MARKERS) for f in files):
                rel = Path(folder).relative_to(self.root)
                name = "_".join(rel.parts) or self.root.resolve().name
                refs.append(SceneRef(name, Path(folder)))
        return refs

    def _views(self, ref: SceneRef) -> list[tuple[str, int, Path]]:
        views = []
        for path in ref.path.iterdir():
            match = _VIEW.match(path.name)
            if match and path.is_file():
                views.append((match["key"], int(match["view"]), path))
        if not views:
            raise ValueError(f"{ref.path}: no <key>_<view>.jpeg images (scene {ref.name})")
        return sorted(views, key=lambda v: (_group_key(v[0]), v[1], v[2].name))

    def _missing(self, image: Path, scene: str) -> tuple[Path | None, str | None]:
        """``(camera file or None, problem or None)`` of the view shown in ``image``."""
        stem = image.with_suffix("")
        cams = [Path(f"{stem}_camera_params{s}") for s in (".json", ".npz")]
        camera = next((c for c in cams if c.is_file()), None)
        depth = Path(f"{stem}_depth.exr")
        if camera is None:
            return None, (f"{cams[0]}: camera parameters not found (nor {cams[1].name}) "
                          f"(scene {scene})")
        if not depth.is_file():
            return camera, f"{depth}: depth file not found (scene {scene})"
        return camera, None

    def read_scene(self, ref: SceneRef) -> Scene:
        frames = []
        for _key, _view, image in self._views(ref):
            camera, problem = self._missing(image, ref.name)
            if problem is not None:
                if not self.options.drop_incomplete_views:
                    raise ValueError(problem)
                self.warn(f"{problem}; view {image.name} dropped")
                continue
            K, c2w = read_camera(camera, ref.name, self.options.pixel_corner_intrinsics)
            frames.append(Frame(frame=len(frames), image=image,
                                depth=Path(f"{image.with_suffix('')}_depth.exr"), K=K, c2w=c2w,
                                extra={"scene": ref.name}))
        return Scene(ref.name, ref.path, frames)

    def read_depth(self, frame: Frame) -> np.ndarray:
        try:
            depth = read_exr_depth(Path(frame.depth))
        except ValueError as exc:
            raise ValueError(f"{exc} (scene {frame.extra.get('scene', '?')})") from exc
        return valid_depth(depth)
