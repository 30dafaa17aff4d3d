"""CO3Dv2 (Common Objects in 3D, v2) as published: object-centric turntable videos.

Layout (``root`` is the dataset root the annotation paths are relative to)::

    <root>/
      <category>/                         e.g. hydrant, teddybear
        frame_annotations.jgz             gzip JSON: every frame of every sequence (read)
        sequence_annotations.jgz          per-sequence metadata (not read)
        set_lists/, eval_batches/         the dataset's own splits (not read)
        <sequence_name>/                  e.g. 106_12648_23157: one scene
          images/frame000001.jpg
          depths/frame000001.jpg.geometric.png
          depth_masks/frame000001.png
          masks/frame000001.png           foreground masks (not read)

Scenes: every sub-folder of a category folder (except ``set_lists``/``eval_batches``) is one
sequence; scene name ``<category>_<sequence_name>``. A partial download (some sequence folders
only) works: sequences annotated but absent on disk are not listed. All annotated frames of a
sequence are used; the dataset's set lists are ignored (the manifest makes its own split).

Frame annotation (``FrameAnnotation`` of the co3d repository's ``dataset/data_types.py``):
``{"sequence_name", "frame_number", "frame_timestamp", "image": {"path", "size": [H, W]},
"depth": {"path", "scale_adjustment", "mask_path"} | null, "mask": {...} | null,
"viewpoint": {"R", "T", "focal_length", "principal_point", "intrinsics_format"}, "meta"}``;
paths are relative to ``root``. A frame without ``viewpoint`` makes its sequence unreadable.

Depth (``native_depth = False``): a 16-bit PNG whose uint16 values are the bit patterns of
float16 numbers; depth = float16 value * ``scale_adjustment``, in the units of the camera
translations (SfM units, metric only up to one scale per sequence). 0 and non-finite values are
invalid (0); with ``use_depth_masks`` the binary PNG ``depth.mask_path`` (> 0 = valid) is
multiplied in. The depth map must have the annotated image size, else the scene is skipped.

Pose: PyTorch3D convention, row vectors: ``X_cam = X_world @ R + T`` with camera axes +X left,
+Y up, +Z forward. OpenCV world-to-camera (exactly pytorch3d's
``opencv_from_cameras_projection``): ``R_cv = (R * [-1, -1, 1]).T`` (first two columns of R
negated, then transposed), ``t_cv = T * [-1, -1, 1]``; ``c2w`` is the inverse of
``[R_cv | t_cv]``.

Intrinsics (NDC to pixels, also as in ``opencv_from_cameras_projection``): with ``half =
[W/2, H/2]`` and ``s = min(H, W)/2`` on both axes for ``"ndc_isotropic"`` (CO3Dv2) or ``s =
half`` per axis for ``"ndc_norm_image_bounds"`` (CO3Dv1, the default when the key is absent):
``f_px = focal_length * s`` and ``c_px = half - principal_point * s``. PyTorch3D's NDC +-1 are
the image borders (pixel i's centre lies at i + 0.5 in those screen coordinates) while our K
puts pixel centres at integers, so 0.5 is subtracted from ``c_px`` (a choice: pytorch3d's own
conversion keeps the half-pixel shift; it is 0.5 px either way). Other formats are unsupported
(the scene is skipped).

Image size: ``image.size`` is the frame's ``Frame.size``; the intrinsics are computed for it, so
an image file of another size makes the manifest builder skip the scene.

Frame order: ``frame_number`` (capture order in the video); ``Frame.frame`` is that number.

Options: ``categories`` (category folder names to read; empty = all), ``use_depth_masks``
(default true: multiply the depth masks in).

Skipped scenes (named with the file in the report): a category without
``frame_annotations.jgz`` or with an unreadable one (not gzip, corrupt or truncated deflate
data, not UTF-8 JSON: all its sequence folders), a malformed frame annotation or one without a
camera (its sequence), a missing image, depth or depth-mask file, an image of another size
than ``image.size``, a depth map or depth mask of the wrong size or unreadable.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from distill3r.data.io import read_depth_png, valid_depth
from distill3r.data.sources.base import (Frame, Scene, SceneRef, Source, check_rotation,
                                         intrinsics, register_source, rigid)
from distill3r.geometry import invert_pose

ANNOTATIONS = "frame_annotations.jgz"
NOT_SEQUENCES = ("set_lists", "eval_batches")  # sub-folders of a category that are not scenes
FORMATS = ("ndc_isotropic", "ndc_norm_image_bounds")
FLIP_XY = np.array([-1.0, -1.0, 1.0])  # PyTorch3D camera axes (x left, y up) <-> OpenCV


@dataclass
class CO3DOptions:
    categories: list[str] = field(default_factory=list)  # empty = every category folder
    use_depth_masks: bool = True


@dataclass
class _Seq:
    category: str
    sequence: str
    annotations: Path


def camera_from_viewpoint(R: Any, T: Any, focal: Any, principal: Any, fmt: str,
                          size_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(K [3,3] pixels with pixel centres at integers, OpenCV c2w [4,4])`` of a CO3D
    viewpoint (PyTorch3D ``R``, ``T``, NDC ``focal``/``principal`` in format ``fmt``) for an
    image of ``size_hw = (H, W)``."""
    R = np.asarray(R, np.float64).reshape(3, 3)
    T = np.asarray(T, np.float64).reshape(3)
    c2w = invert_pose(rigid((R * FLIP_XY[None, :]).T, T * FLIP_XY))
    h, w = size_hw
    half = np.array([w / 2.0, h / 2.0])
    if fmt == "ndc_isotropic":
        scale = np.full(2, min(h, w) / 2.0)
    elif fmt == "ndc_norm_image_bounds":
        scale = half
    else:
        raise ValueError(f"unsupported intrinsics_format {fmt!r} (known: {', '.join(FORMATS)})")
    f_px = np.asarray(focal, np.float64).reshape(2) * scale
    c_px = half - np.asarray(principal, np.float64).reshape(2) * scale - 0.5
    return intrinsics(f_px[0], f_px[1], c_px[0], c_px[1]), c2w


def _get(d: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(d, dict):
        raise TypeError(f"{what} is not an object")
    if key not in d:
        raise ValueError(f"{what}.{key} missing")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{what}.{key} has type {type(value).__name__}")
    return value


def _numbers(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, np.float64)
    except (TypeError, ValueError, OverflowError) as exc:  # overflow: a JSON integer > 1e308
        raise TypeError(f"{what} is not numeric (or beyond the float64 range)") from exc
    if arr.shape != shape or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite numbers of shape {list(shape)}")
    return arr


def _rel_path(root: Path, value: str, what: str) -> Path:
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts or not value:
        raise ValueError(f"{what} {value!r} is not a path relative to the dataset root")
    return root / rel


def _load_annotations(path: Path) -> dict[str, list[dict]]:
    """Frame annotations of one category grouped by sequence name (unparsed entries)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            entries = json.load(f)
    # bad gzip header or CRC, corrupt deflate data, truncated, bad UTF-8 or JSON, JSON nested
    # deeper than the parser's recursion limit
    except (OSError, EOFError, zlib.error, ValueError, RecursionError) as exc:
        raise ValueError(f"not a readable gzip JSON file: {exc}") from exc
    if not isinstance(entries, list):
        raise ValueError("expected a JSON list of frame annotations")
    by_seq: dict[str, list[dict]] = {}
    for entry in entries:
        name = entry.get("sequence_name") if isinstance(entry, dict) else None
        # "" collects entries naming no sequence (no sequence folder can have that name)
        by_seq.setdefault(name if isinstance(name, str) else "", []).append(entry)
    return by_seq


@register_source
class CO3DSource(Source):
    """CO3Dv2 categories of object-centric videos (see the module docstring)."""

    kind = "co3d"
    native_depth = False
    Options = CO3DOptions

    def __init__(self, root: str | Path, name: str | None = None, options: Any = None):
        super().__init__(root, name, options)
        # the last category's annotations: scenes come sorted, so a category is read once
        self._cache: tuple[Path, dict[str, list[dict]] | str] | None = None

    def _categories(self) -> list[Path]:
        wanted = list(self.options.categories)
        folders = sorted(p for p in self.root.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        if not wanted:
            return folders
        found = {p.name: p for p in folders}
        for missing in sorted(set(wanted) - set(found)):
            self.warn(f"{self.root / missing}: category folder not found (options.categories)")
        return [found[c] for c in sorted(set(wanted)) if c in found]

    def find_scenes(self) -> list[SceneRef]:
        refs = []
        for cat in self._categories():
            seqs = [p for p in sorted(cat.iterdir()) if p.is_dir()
                    and not p.name.startswith(".") and p.name not in NOT_SEQUENCES]
            if not seqs and not (cat / ANNOTATIONS).is_file():
                self.warn(f"{cat}: not a CO3D category folder (no {ANNOTATIONS}, no sequences)")
            for seq in seqs:
                refs.append(SceneRef(f"{cat.name}_{seq.name}", seq,
                                     _Seq(cat.name, seq.name, cat / ANNOTATIONS)))
        return refs

    def _sequences(self, path: Path, scene: str) -> dict[str, list[dict]]:
        if self._cache is None or self._cache[0] != path:
            if not path.is_file():
                loaded: dict[str, list[dict]] | str = "annotation file not found"
            else:
                try:
                    loaded = _load_annotations(path)
                except ValueError as exc:
                    loaded = str(exc)
                else:
                    if loaded.get(""):
                        self.warn(f"{path}: {len(loaded[''])} frame annotation(s) without a "
                                  "sequence_name ignored")
            self._cache = (path, loaded)
        loaded = self._cache[1]
        if isinstance(loaded, str):
            raise ValueError(f"{path}: {loaded} (scene {scene})")
        return loaded

    def read_scene(self, ref: SceneRef) -> Scene:
        seq: _Seq = ref.data
        entries = self._sequences(seq.annotations, ref.name).get(seq.sequence)
        if not entries:
            raise ValueError(f"{seq.annotations}: no frame annotations for sequence "
                             f"{seq.sequence!r} (scene {ref.name})")
        frames = []
        for i, entry in enumerate(entries):
            try:
                frames.append(self._frame(entry, ref.name))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{seq.annotations}: malformed frame annotation {i} of "
                                 f"sequence {seq.sequence!r}: {exc} (scene {ref.name})") from exc
        for frame in frames:
            mask = frame.extra.get("depth_mask")
            if mask is not None and not mask.is_file():
                raise ValueError(f"{mask}: depth mask file not found (scene {ref.name})")
        return Scene(ref.name, ref.path, frames)

    def _frame(self, entry: dict, scene: str) -> Frame:
        number = _get(entry, "frame_number", int, "frame")
        if number < 0:
            raise ValueError(f"frame_number {number} is negative")
        image = _get(entry, "image", dict, "frame")
        size = _numbers(_get(image, "size", list, "image"), (2,), "image.size")
        if np.any(size < 1) or np.any(size != np.round(size)):
            raise ValueError(f"image.size {size.tolist()} is not two positive integers")
        h, w = int(size[0]), int(size[1])
        view = _get(entry, "viewpoint", dict, "frame")
        fmt = view.get("intrinsics_format", "ndc_norm_image_bounds")
        R = check_rotation(_numbers(_get(view, "R", list, "viewpoint"), (3, 3), "viewpoint.R"),
                           "viewpoint.R", atol=1e-4)
        K, c2w = camera_from_viewpoint(
            R, _numbers(_get(view, "T", list, "viewpoint"), (3,), "viewpoint.T"),
            _numbers(_get(view, "focal_length", list, "viewpoint"), (2,), "focal_length"),
            _numbers(_get(view, "principal_point", list, "viewpoint"), (2,), "principal_point"),
            fmt, (h, w))
        frame = Frame(frame=number, image=_rel_path(self.root, _get(image, "path", str, "image"),
                                                    "image.path"),
                      K=K, c2w=c2w, size=(h, w), extra={"scene": scene})
        depth = entry.get("depth")
        if depth is not None:
            self._add_depth(frame, depth)
        return frame

    def _add_depth(self, frame: Frame, depth: Any) -> None:
        frame.depth = _rel_path(self.root, _get(depth, "path", str, "depth"), "depth.path")
        scale = _numbers(_get(depth, "scale_adjustment", (int, float), "depth"), (),
                         "depth.scale_adjustment")
        if scale <= 0:
            raise ValueError(f"depth.scale_adjustment {scale} is not a positive number")
        frame.extra["scale"] = float(scale)
        mask = depth.get("mask_path")
        if self.options.use_depth_masks and mask is not None:
            if not isinstance(mask, str):
                raise TypeError("depth.mask_path is not a string")
            frame.extra["depth_mask"] = _rel_path(self.root, mask, "depth.mask_path")

    def read_depth(self, frame: Frame) -> np.ndarray:
        scene = frame.extra["scene"]
        path = Path(frame.depth)
        # uint16 values are exact in float32, so this gives back the stored float16 bit patterns
        bits = read_depth_png(path, 1.0, f"scene {scene}").astype(np.uint16)
        if bits.shape != frame.size:
            h, w = frame.size
            raise ValueError(f"{path}: depth is {bits.shape[1]}x{bits.shape[0]} but the "
                             f"annotated image size is {w}x{h} (scene {scene})")
        depth = valid_depth(bits.view(np.float16).astype(np.float32)
                            * np.float32(frame.extra["scale"]))
        mask_path = frame.extra.get("depth_mask")
        if mask_path is not None:
            try:
                mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            except cv2.error:  # e.g. a header claiming more pixels than OpenCV decodes
                mask = None
            if mask is None or mask.shape != depth.shape:
                raise ValueError(f"{mask_path}: not a depth mask of the depth's size "
                                 f"{depth.shape[1]}x{depth.shape[0]} (scene {scene})")
            depth[mask == 0] = 0
        return depth
