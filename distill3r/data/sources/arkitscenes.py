"""ARKitScenes, low-resolution iPad stream (raw dataset or the 3DOD subset).

Layout (``<root>`` holds split folders, or video folders directly)::

    <root>/Training/<video_id>/                 raw layout (split: Training, Validation, ...)
        lowres_wide/<video_id>_<timestamp>.png          RGB 256x192
        lowres_depth/<video_id>_<timestamp>.png         uint16 millimetres, 0 = invalid
        lowres_wide_intrinsics/<video_id>_<timestamp>.pincam
        lowres_wide.traj
    <root>/Validation/<video_id>/<video_id>_frames/ 3DOD layout: the same files one level down

Files read: the three folders above and ``lowres_wide.traj``; ``confidence/``, the high-res
streams, meshes and annotations are not. The dataset's own split folders are not used (the
project assigns train/val by its stable scene hash). Scene name = ``<video_id>`` (folder name).

Intrinsics: ``.pincam`` is one line ``width height fx fy cx cy`` in pixels; the principal point
is used as is (pixel centres at integers, as ARKitScenes' own back-projection does).
``width height`` is the frame's ``Frame.size``: an image of another size makes the manifest
builder skip the scene (``K`` would not fit it). A frame without a ``.pincam`` of the same
name takes the one whose time stamp is within 1.5 ms (the names are rounded to 1 ms); frames
with none are dropped with a warning.

Poses: ``lowres_wide.traj`` has one line per pose, ``timestamp rx ry rz tx ty tz``, where
``(rx, ry, rz)`` is an axis-angle rotation (radians) and ``(R, t)`` maps world to camera; the
camera axes are the pinhole intrinsics' (OpenCV: x right, y down, z forward), so
``c2w = inverse([R t; 0 1])`` with no axis change. Each frame takes the pose with the nearest
time stamp within ``max_time_diff`` seconds; frames without one are dropped with a warning.

Depth: ``lowres_depth`` has the image's name and size, uint16 millimetres, 0 = invalid; converted
to ``.npy`` metres by the builder (``native_depth = False``). Frames without a depth file have
no depth.

Frame order: time stamp; ``frame_step`` keeps every k-th frame of that order (the stream is
10-60 Hz and neighbouring frames are nearly identical).

Scenes: every video folder directly under the root or under one of its sub-folders (split
folders); hidden entries are ignored, loose files and folders holding no video are warned
about. Skipped scenes (the reason names the file): a missing, unreadable or malformed
``lowres_wide.traj``, no ``lowres_wide`` or ``lowres_wide_intrinsics`` folder, a file name
without a time stamp there, a malformed ``.pincam``, an image of another size than its
``.pincam``, a depth map that is not a single-channel 16-bit PNG of the image's size.

Options: ``max_time_diff`` (seconds, default 0.05), ``frame_step`` (default 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill3r.data.io import read_depth_png
from distill3r.data.sources.base import (Frame, Scene, SceneRef, Source, intrinsics,
                                         register_source, rigid, subfolders)
from distill3r.geometry import invert_pose

PINCAM_TOLERANCE = 0.0015  # seconds: intrinsics file names are rounded to 1 ms


@dataclass
class ArkitScenesOptions:
    max_time_diff: float = 0.05
    frame_step: int = 1

    def __post_init__(self) -> None:
        if not self.max_time_diff > 0:
            raise ValueError(f"arkitscenes options.max_time_diff={self.max_time_diff!r}: "
                             "must be > 0")
        if self.frame_step < 1:
            raise ValueError(f"arkitscenes options.frame_step={self.frame_step!r}: must be >= 1")


@register_source
class ArkitScenesSource(Source):
    """ARKitScenes low-res RGB-D frames with ARKit poses (see the module docstring)."""

    kind = "arkitscenes"
    native_depth = False
    Options = ArkitScenesOptions

    def find_scenes(self) -> list[SceneRef]:
        refs = []
        for path in subfolders(self):
            if _is_video(path):
                refs.append(SceneRef(path.name, path))
                continue
            videos = [p for p in subfolders(self, path) if _is_video(p)]
            if not videos:
                self.warn(f"{path}: neither an ARKitScenes video folder nor a split folder of "
                          "them, skipped")
            for video in videos:
                refs.append(SceneRef(video.name, video))
        return refs

    def read_scene(self, ref: SceneRef) -> Scene:
        data = ref.path / f"{ref.name}_frames"
        data = data if data.is_dir() else ref.path
        traj_path = data / "lowres_wide.traj"
        times, w2c = _read_traj(traj_path, ref.name)
        images = _timestamped(data / "lowres_wide", ".png", ref.name)
        pincams = _timestamped(data / "lowres_wide_intrinsics", ".pincam", ref.name)
        pincam_times = np.array(sorted(pincams))
        no_pose, no_pincam, frames = [], [], []
        for stamp in sorted(images):
            image = images[stamp]
            pincam = data / "lowres_wide_intrinsics" / f"{image.stem}.pincam"
            if not pincam.is_file():
                near = _nearest(pincam_times, stamp, PINCAM_TOLERANCE)
                if near is None:
                    no_pincam.append(image.name)
                    continue
                pincam = pincams[float(pincam_times[near])]
            pose = _nearest(times, stamp, self.options.max_time_diff)
            if pose is None:
                no_pose.append(image.name)
                continue
            depth = data / "lowres_depth" / image.name
            K, size = _read_pincam(pincam, ref.name)
            frames.append(Frame(frame=len(frames), image=image,
                                depth=depth if depth.is_file() else None, K=K,
                                c2w=invert_pose(w2c[pose]), size=size,
                                extra={"scene": ref.name}))
        if no_pincam:
            self.warn(f"{data / 'lowres_wide_intrinsics'}: no .pincam for {len(no_pincam)} "
                      f"frame(s) (e.g. {no_pincam[0]}), dropped (scene {ref.name})")
        if no_pose:
            self.warn(f"{traj_path}: no pose within {self.options.max_time_diff} s for "
                      f"{len(no_pose)} frame(s) (e.g. {no_pose[0]}), dropped (scene {ref.name})")
        frames = frames[::self.options.frame_step]
        for i, frame in enumerate(frames):
            frame.frame = i
        return Scene(ref.name, ref.path, frames)

    def read_depth(self, frame: Frame) -> np.ndarray:
        scene = frame.extra.get("scene", "?")
        return read_depth_png(frame.depth, 1e-3, f"scene {scene}")  # uint16 millimetres


def _is_video(path: Path) -> bool:
    return ((path / "lowres_wide").is_dir() or (path / "lowres_wide.traj").is_file()
            or (path / f"{path.name}_frames").is_dir())


def _timestamped(folder: Path, suffix: str, scene: str) -> dict[float, Path]:
    """``{timestamp: path}`` of the ``<video_id>_<timestamp><suffix>`` files in ``folder``."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: folder not found (scene {scene})")
    out = {}
    for path in folder.iterdir():
        if path.suffix != suffix:
            continue
        try:
            out[float(path.stem.rsplit("_", 1)[-1])] = path
        except ValueError:
            raise ValueError(f"{path}: no time stamp in the file name, expected "
                             f"<video_id>_<seconds>{suffix} (scene {scene})") from None
    return out


def _nearest(times: np.ndarray, t: float, tolerance: float) -> int | None:
    """Index of the value of sorted ``times`` nearest to ``t`` if within ``tolerance``."""
    if times.size == 0:
        return None
    i = int(np.searchsorted(times, t))
    best = min((j for j in (i - 1, i) if 0 <= j < times.size), key=lambda j: abs(times[j] - t))
    return best if abs(times[best] - t) <= tolerance else None


def _read_traj(path: Path, scene: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted time stamps ``[N]`` and world-to-camera poses ``[N,4,4]`` of a ``.traj`` file."""
    if not path.is_file():
        raise ValueError(f"{path}: trajectory file not found (scene {scene})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable trajectory file: {exc} (scene {scene})") from exc
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) != 7 or not np.all(np.isfinite(values)):
            raise ValueError(f"{path}: line {n} is not 'timestamp rx ry rz tx ty tz' "
                             f"(scene {scene})")
        rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no poses (scene {scene})")
    table = np.array(sorted(rows))
    w2c = np.stack([rigid(axis_angle_to_matrix(r[1:4]), r[4:7]) for r in table])
    return table[:, 0], w2c


def axis_angle_to_matrix(v: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation by ``|v|`` radians about ``v / |v|``."""
    v = np.asarray(v, np.float64)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.eye(3)
    x, y, z = v / angle
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _read_pincam(path: Path, scene: str) -> tuple[np.ndarray, tuple[int, int]]:
    """``(K [3,3], (H, W))`` of a ``.pincam`` file ``width height fx fy cx cy``."""
    try:
        values = [float(v) for v in path.read_text().split()]
    except (OSError, UnicodeDecodeError, ValueError):
        values = []
    if (len(values) != 6 or not all(np.isfinite(values))
            or not all(v >= 1 and v == int(v) for v in values[:2])):
        raise ValueError(f"{path}: expected one line 'width height fx fy cx cy' with a "
                         f"positive integer width and height (scene {scene})")
    width, height, fx, fy, cx, cy = values
    return intrinsics(fx, fy, cx, cy), (int(height), int(width))
