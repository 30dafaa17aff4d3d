"""ScanNet++ (v1 and v2), DSLR stream, undistorted by the ScanNet++ toolkit.

Layout (``<root>/data/<scene_id>/`` as downloaded, or ``<root>/<scene_id>/``)::

    <root>/data/<scene_id>/
        dslr/
            resized_images/DSC01234.JPG                 fisheye, distorted (not read)
            resized_undistorted_images/DSC01234.JPG     pinhole (options.images_dir)
            nerfstudio/transforms.json                  fisheye camera (read for fisheye depth)
            nerfstudio/transforms_undistorted.json      pinhole camera (options.transforms)
            render_depth/DSC01234.png                   optional (options.depth_dir)
            colmap/, train_test_lists.json              not read
        scans/mesh_aligned_0.05.ply                     not read

The pinhole images and ``transforms_undistorted.json`` come from the toolkit's
``python -m dslr.undistort`` (v2 downloads ship them; the script's own default output folder
is ``undistorted_images``: set ``images_dir`` to match); a transforms file whose
``camera_model`` is not ``PINHOLE``/``SIMPLE_PINHOLE`` or that has a nonzero distortion
coefficient makes the scene skipped with a message saying to run that script.

Transforms file (nerfstudio format): ``fl_x fl_y cx cy w h camera_model k1..k4 [p1 p2]`` at the
top (a frame may override the intrinsics), ``frames`` and ``test_frames``: lists of
``{"file_path", "transform_matrix", "is_bad"}``. ``transform_matrix`` is camera-to-world with
nerfstudio/OpenGL camera axes (x right, y up, z backward): OpenCV ``c2w = T @ GL_TO_CV``.
Principal points follow nerfstudio/COLMAP (continuous coordinates with the image corner at 0,
pixel centres at +0.5); the project puts pixel centres at integers, so ``K`` uses
``cx - 0.5, cy - 0.5``. ``w``/``h`` are the image size (``Frame.size``): an image file of
another size makes the manifest builder skip the scene, since ``K`` would not fit it.

Depth (optional): ScanNet++ ships none for the DSLR; the toolkit's ``python -m common.render``
writes ``dslr/render_depth/<image stem>.png``: uint16 millimetres, 0 = invalid, z-depth. It
renders with the *fisheye* camera of ``dslr/colmap``, i.e. aligned with ``resized_images``, not
with the undistorted images. With ``depth_camera: fisheye`` (default) each depth map is warped
into the pinhole image by nearest neighbour with the toolkit's own undistortion mapping (the
pinhole ray of each pixel through the OpenCV fisheye model of ``transforms.json``, both
intrinsics taken as written, like the toolkit's ``cv2`` maps), so depth lands where the RGB
pixel landed; z-depth is the same under both camera models. With ``depth_camera: pinhole`` the
depth files are taken to be aligned with the undistorted images already. Frames without a depth
file, or scenes without the depth folder, have no depth. Depth is converted to ``.npy`` metres
by the builder (``native_depth = False``).

Frames: ``frames`` plus ``test_frames`` (``include_test_frames``), without ``is_bad`` ones
(``skip_bad_frames``), sorted by image file name (DSC numbering = capture order); frames whose
image is missing (hidden test images) are dropped with a warning.

Skipped scenes (the reason names the file): a missing or unreadable transforms file (not
UTF-8 JSON, numbers beyond the float64 range, malformed frames), a distorted camera in it, an
image of another size than its ``w``/``h``; with fisheye depth a ``fisheye_transforms`` file
that is not ``OPENCV_FISHEYE``, or a depth map not of its size; a depth map that is not a
single-channel 16-bit PNG or not of the image's size.

Options: ``images_dir``, ``transforms``, ``fisheye_transforms`` (file names under ``dslr/`` and
``dslr/nerfstudio/``), ``depth_dir`` (under ``dslr/``, "" = no depth), ``depth_camera``
(``fisheye`` | ``pinhole``), ``include_test_frames``, ``skip_bad_frames``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill3r.data.io import read_depth_png
from distill3r.data.sources.base import (Frame, Scene, SceneRef, Source, intrinsics,
                                         register_source, subfolders)
from distill3r.geometry import GL_TO_CV
from distill3r.jsonio import read_json

PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "k5", "k6", "p1", "p2")
DEPTH_CAMERAS = ("fisheye", "pinhole")


@dataclass
class ScannetppOptions:
    images_dir: str = "resized_undistorted_images"
    transforms: str = "transforms_undistorted.json"
    fisheye_transforms: str = "transforms.json"
    depth_dir: str = "render_depth"
    depth_camera: str = "fisheye"
    include_test_frames: bool = True
    skip_bad_frames: bool = True

    def __post_init__(self) -> None:
        if self.depth_camera not in DEPTH_CAMERAS:
            raise ValueError(f"scannetpp options.depth_camera={self.depth_camera!r}: expected "
                             f"one of {', '.join(DEPTH_CAMERAS)}")


@dataclass(frozen=True)
class FisheyeCamera:
    """The OpenCV fisheye camera the toolkit renders DSLR depth with (``transforms.json``)."""

    fx: float
    fy: float
    cx: float
    cy: float
    k: tuple[float, float, float, float]
    size: tuple[int, int]  # (w, h)
    source: Path  # the transforms file (for error messages)


@register_source
class ScannetppSource(Source):
    """ScanNet++ DSLR frames, undistorted (see the module docstring)."""

    kind = "scannetpp"
    native_depth = False
    Options = ScannetppOptions

    def __init__(self, root: str | Path, name: str | None = None, options: Any = None):
        super().__init__(root, name, options)
        self._warp_cache: tuple[tuple, np.ndarray, np.ndarray] | None = None

    def find_scenes(self) -> list[SceneRef]:
        base = self.root / "data" if (self.root / "data").is_dir() else self.root
        refs = []
        for path in subfolders(self, base):
            if (path / "dslr").is_dir():
                refs.append(SceneRef(path.name, path))
            else:
                self.warn(f"{path}: not a ScanNet++ scene folder (no dslr/), skipped")
        return refs

    def read_scene(self, ref: SceneRef) -> Scene:
        opts = self.options
        dslr = ref.path / "dslr"
        path = dslr / "nerfstudio" / opts.transforms
        meta = _load_json(path, "transforms file", ref.name)
        _check_pinhole(meta, path, ref.name)
        entries = list(_list(meta, "frames", path, ref.name))
        if opts.include_test_frames:
            entries += _list(meta, "test_frames", path, ref.name)
        if opts.skip_bad_frames:
            entries = [e for e in entries if not (isinstance(e, dict) and e.get("is_bad"))]
        depth_dir = dslr / opts.depth_dir if opts.depth_dir else None
        if depth_dir is not None and not depth_dir.is_dir():
            depth_dir = None
        fisheye = None
        if depth_dir is not None and opts.depth_camera == "fisheye":
            fisheye = _fisheye_camera(dslr / "nerfstudio" / opts.fisheye_transforms, ref.name)
        frames, missing = [], []
        for entry in entries:
            frame = _frame(entry, meta, dslr / opts.images_dir, depth_dir, path, ref.name)
            if not frame.image.is_file():
                missing.append(frame.image.name)
                continue
            frame.extra.update(scene=ref.name, fisheye=fisheye)
            frames.append(frame)
        if missing:
            self.warn(f"{dslr / opts.images_dir}: {len(missing)} frame(s) of {path.name} have no "
                      f"image (e.g. {missing[0]}), dropped (scene {ref.name})")
        frames.sort(key=lambda f: f.image.name)
        for i, frame in enumerate(frames):
            frame.frame = i
        return Scene(ref.name, ref.path, frames)

    def read_depth(self, frame: Frame) -> np.ndarray:
        scene = frame.extra.get("scene", "?")
        depth = read_depth_png(frame.depth, 1e-3, f"scene {scene}")  # uint16 millimetres
        fisheye: FisheyeCamera | None = frame.extra.get("fisheye")
        if fisheye is None:
            return depth
        if (depth.shape[1], depth.shape[0]) != fisheye.size:
            raise ValueError(f"{frame.depth}: fisheye depth is {depth.shape[1]}x{depth.shape[0]}"
                             f" but {fisheye.source} says {fisheye.size[0]}x{fisheye.size[1]}"
                             f" (scene {scene})")
        rows, cols = self._warp_indices(fisheye, frame.extra["pinhole"], frame.size)
        out = np.zeros(rows.shape, np.float32)
        ok = rows >= 0
        out[ok] = depth[rows[ok], cols[ok]]
        return out

    def _warp_indices(self, fisheye: FisheyeCamera, pinhole: tuple, size: tuple[int, int]):
        """The nearest fisheye pixel (row, col) of every pinhole pixel (-1 outside); cached for
        the last camera, since the builder reads a scene's frames one after the other."""
        key = (fisheye, pinhole, size)
        if self._warp_cache is None or self._warp_cache[0] != key:
            self._warp_cache = (key, *_pinhole_to_fisheye(fisheye, pinhole, size))
        return self._warp_cache[1], self._warp_cache[2]


def _load_json(path: Path, what: str, scene: str) -> dict:
    """``jsonio.read_json`` with the scene in the message."""
    try:
        return read_json(path, what)
    except ValueError as exc:
        raise ValueError(f"{exc} (scene {scene})") from exc


def _list(meta: dict, key: str, path: Path, scene: str) -> list:
    value = meta.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{path}: '{key}' must be a list (scene {scene})")
    return value


def _number(meta: dict, key: str, path: Path, scene: str, default: float | None = None) -> float:
    value = meta.get(key, default)
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):  # overflow: a JSON integer beyond float64
        raise ValueError(f"{path}: '{key}' missing or not a number: {value!r} "
                         f"(scene {scene})") from None
    if not np.isfinite(out):
        raise ValueError(f"{path}: '{key}' is not finite (scene {scene})")
    return out


def _check_pinhole(meta: dict, path: Path, scene: str) -> None:
    model = str(meta.get("camera_model", "PINHOLE"))
    distorted = [k for k in DISTORTION_KEYS if _number(meta, k, path, scene, 0.0) != 0.0]
    if model not in PINHOLE_MODELS or distorted:
        what = f"camera_model {model}" + (f" with {', '.join(distorted)} != 0" if distorted
                                          else "")
        raise ValueError(f"{path}: {what} is a distorted camera; only undistorted pinhole images "
                         f"are supported: run the ScanNet++ toolkit's DSLR undistortion "
                         f"(python -m dslr.undistort) and point options.images_dir/transforms "
                         f"at its output (scene {scene})")


def _frame(entry: Any, meta: dict, images: Path, depth_dir: Path | None, path: Path,
           scene: str) -> Frame:
    if not isinstance(entry, dict) or not isinstance(entry.get("file_path"), str):
        raise ValueError(f"{path}: frame without a 'file_path': {str(entry)[:80]} "
                         f"(scene {scene})")
    name = entry["file_path"]
    try:
        T = np.asarray(entry["transform_matrix"], np.float64)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ValueError(f"{path}: frame {name}: missing or malformed 'transform_matrix' "
                         f"(scene {scene})") from None
    if T.shape == (3, 4):
        T = np.vstack([T, [0.0, 0.0, 0.0, 1.0]])
    if T.shape != (4, 4):
        raise ValueError(f"{path}: frame {name}: transform_matrix must be 4x4 (scene {scene})")
    fx, fy, cx, cy = (_number(entry, k, path, scene, meta.get(k))
                      for k in ("fl_x", "fl_y", "cx", "cy"))
    size = (int(_number(entry, "h", path, scene, meta.get("h"))),
            int(_number(entry, "w", path, scene, meta.get("w"))))
    image = images / name
    if not image.is_file() and (images / Path(name).name).is_file():
        image = images / Path(name).name
    depth = None
    if depth_dir is not None and (depth_dir / f"{Path(name).stem}.png").is_file():
        depth = depth_dir / f"{Path(name).stem}.png"
    return Frame(frame=0, image=image, depth=depth, K=intrinsics(fx, fy, cx - 0.5, cy - 0.5),
                 c2w=T @ GL_TO_CV, size=size, extra={"pinhole": (fx, fy, cx, cy)})


def _fisheye_camera(path: Path, scene: str) -> FisheyeCamera:
    meta = _load_json(path, "fisheye transforms file", scene)
    model = str(meta.get("camera_model", ""))
    if model != "OPENCV_FISHEYE":
        raise ValueError(f"{path}: camera_model {model or '(none)'}, expected OPENCV_FISHEYE "
                         f"for depth_camera: fisheye (the camera the toolkit renders depth "
                         f"with) (scene {scene})")
    fx, fy, cx, cy, w, h = (_number(meta, k, path, scene)
                            for k in ("fl_x", "fl_y", "cx", "cy", "w", "h"))
    k1, k2, k3, k4 = (_number(meta, k, path, scene, 0.0) for k in ("k1", "k2", "k3", "k4"))
    return FisheyeCamera(fx, fy, cx, cy, (k1, k2, k3, k4), (int(w), int(h)), path)


def _pinhole_to_fisheye(fisheye: FisheyeCamera, pinhole: tuple, size: tuple[int, int]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV fisheye model: ``theta = atan(r)``, ``r_d = theta (1 + k1 theta^2 + ... +
    k4 theta^8)``; pixel = f * (r_d / r) * (x, y) + c. Returns nearest (row, col), -1 outside."""
    h, w = size
    fx, fy, cx, cy = pinhole
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = (u - cx) / fx, (v - cy) / fy
    r = np.hypot(x, y)
    theta = np.arctan(r)
    t2 = theta * theta
    k1, k2, k3, k4 = fisheye.k
    r_d = theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
    scale = np.where(r > 1e-12, r_d / np.maximum(r, 1e-12), 1.0)
    col = np.rint(fisheye.fx * scale * x + fisheye.cx)
    row = np.rint(fisheye.fy * scale * y + fisheye.cy)
    fw, fh = fisheye.size
    inside = (col >= 0) & (col < fw) & (row >= 0) & (row < fh)
    return (np.where(inside, row, -1).astype(np.int64),
            np.where(inside, col, -1).astype(np.int64))

