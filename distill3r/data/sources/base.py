"""The source interface: how one dataset's on-disk layout becomes scenes of frames.

A source finds its scenes cheaply (:meth:`Source.find_scenes`), then reads each one
(:meth:`Source.read_scene`) into frames: image path, optional depth path, optional ``K``
[3,3] pixels and ``c2w`` [4,4] OpenCV camera-to-world (x right, y down, z forward). Adding a
dataset is one class in its own module of this package::

    @register_source
    class MySource(Source):
        kind = "mine"                           # params.yaml: data.sources[i].kind

        def find_scenes(self) -> list[SceneRef]:
            ...                                 # names and folders under self.root
        def read_scene(self, ref: SceneRef) -> Scene:
            ...                                 # frames of one scene; ValueError if bad

A ``ValueError`` from :meth:`read_scene` (or from the checks below) skips that scene only: the
message must name the file and the scene; :meth:`Source.scenes` returns it in ``skipped``
and the manifest builder lists it in the manifest report. A missing root raises. Readers turn
every error of their parsers (zlib, struct, h5py...) into such a ``ValueError``; a
:class:`SkipFrame` from :meth:`Source.read_depth` drops one frame instead.

Depth: when a dataset stores depth in another encoding than the project's (16-bit PNG at
0.1 mm or ``.npy`` metres, ``distill3r.data.io.read_depth``), the source sets
``native_depth = False`` and overrides :meth:`Source.read_depth` (metres, float32, 0 where
invalid, same size as the image); the builder then writes the converted map as ``.npy``.
Per-frame data a source needs for that (scale factors, mask paths) goes in ``Frame.extra``.

Frame order: ``Frame.frame`` is the order the dataset makes sense in (capture time for
videos, a covisibility chain for photo collections, see :mod:`distill3r.data.ordering`);
the cache's ``stride`` and ``nearby`` samplings rely on it.

Options: a source may declare ``Options`` (a dataclass); ``data.sources[i].options`` is
checked against it like every other parameter.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from distill3r.progress import progress_bar

from distill3r.config import SourceParams, from_dict
from distill3r.data.io import read_depth

log = logging.getLogger(__name__)


@dataclass
class Frame:
    """One view of a scene as the source provides it (any resolution)."""

    frame: int
    image: Path
    depth: Path | None = None
    K: np.ndarray | None = None  # [3,3] float64, pixels, matching ``image``
    c2w: np.ndarray | None = None  # [4,4] float64, OpenCV camera-to-world
    size: tuple[int, int] | None = None  # (H, W) the dataset says the image has (K refers to it)
    extra: dict[str, Any] = field(default_factory=dict)  # source-private (e.g. depth scale)


@dataclass
class Scene:
    name: str
    path: Path  # the scene's folder or file (named in error messages)
    frames: list[Frame] = field(default_factory=list)


@dataclass
class SceneRef:
    """A scene found but not read yet; ``data`` is whatever the source needs to read it."""

    name: str
    path: Path
    data: Any = None


@dataclass
class _NoOptions:
    pass


class Source(ABC):
    """Base class of every dataset reader; subclasses set ``kind`` and implement
    :meth:`find_scenes` and :meth:`read_scene`. Use :meth:`scenes` rather than calling them."""

    kind: ClassVar[str] = ""
    native_depth: ClassVar[bool] = True  # depth files readable by io.read_depth as they are
    Options: ClassVar[type] = _NoOptions

    def __init__(self, root: str | Path, name: str | None = None, options: Any = None):
        self.root = Path(root)
        self.name = name or self.kind
        self.options = options if options is not None else self.Options()
        self.warnings: list[str] = []  # skipped files etc., for the manifest report
        self.skipped: list[dict] = []  # {"scene", "path", "reason"} per unreadable scene

    @classmethod
    def from_params(cls, params: SourceParams, where: str = "data.sources") -> "Source":
        options = from_dict(cls.Options, params.options or {}, f"{where}.options")
        return cls(params.root, params.name, options)

    @abstractmethod
    def find_scenes(self) -> list[SceneRef]:
        """Every scene under ``self.root`` (cheap: no per-frame reading)."""

    @abstractmethod
    def read_scene(self, ref: SceneRef) -> Scene:
        """The frames of one scene; ``ValueError`` naming the file and scene if unreadable."""

    def read_depth(self, frame: Frame) -> np.ndarray:
        """Metric depth ``[H,W]`` float32 of ``frame`` (0 = invalid); override with
        ``native_depth = False`` for other encodings."""
        return read_depth(frame.depth)

    def depth_is_native(self, frame: Frame) -> bool:
        """Whether ``frame.depth`` can go into the manifest as it is (readable by
        ``io.read_depth`` with the same values); else the builder writes the converted map."""
        return self.native_depth

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def skip(self, name: str, path: Path, reason: str) -> None:
        """Record a scene that cannot be used (the reason names the file)."""
        log.warning("%s: scene %s skipped: %s", path, name, reason)
        self.skipped.append({"scene": name, "path": str(path), "reason": reason})

    def scenes(self, progress: bool = False) -> list[Scene]:
        """Readable scenes sorted by name, frames sorted by index; unreadable ones are in
        ``self.skipped``. Raises only if the root is missing or nothing was found at all."""
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: source folder not found (data.sources kind "
                             f"{self.kind!r})")
        refs = sorted(self.find_scenes(), key=lambda r: r.name)
        names = [r.name for r in refs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{self.root}: duplicate scene names {dupes[:5]}")
        scenes = []
        for ref in progress_bar(refs, desc=f"read {self.name}", unit="scene", disable=not progress):
            try:
                scene = self.read_scene(ref)
                check_scene(scene)
            except ValueError as exc:
                self.skip(ref.name, ref.path, str(exc))
                continue
            scene.frames.sort(key=lambda f: f.frame)
            scenes.append(scene)
        if not scenes and not self.skipped:
            raise ValueError(f"{self.root}: no scenes found for source kind {self.kind!r}")
        return scenes


def check_scene(scene: Scene) -> None:
    """Frames present, unique indices, files exist, ``K``/``c2w`` well formed (in place)."""
    if not scene.frames:
        raise ValueError(f"{scene.path}: empty scene {scene.name} (no frames)")
    ids = [f.frame for f in scene.frames]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{scene.path}: duplicate frame indices in scene {scene.name}")
    for f in scene.frames:
        if not Path(f.image).is_file():
            raise ValueError(f"{f.image}: image file not found (scene {scene.name})")
        if f.depth is not None and not Path(f.depth).is_file():
            raise ValueError(f"{f.depth}: depth file not found (scene {scene.name})")
        if f.K is not None:
            K = np.asarray(f.K, np.float64)
            if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
                raise ValueError(f"{f.image}: K must be a finite 3x3 with positive focal "
                                 f"lengths (scene {scene.name})")
            f.K = K
        if f.c2w is not None:
            T = np.asarray(f.c2w, np.float64)
            if (T.shape != (4, 4) or not np.all(np.isfinite(T))
                    or not np.allclose(T[3], [0, 0, 0, 1])):
                raise ValueError(f"{f.image}: c2w must be a finite 4x4 with last row 0 0 0 1 "
                                 f"(scene {scene.name})")
            f.c2w = T


class SkipFrame(Exception):
    """Raised by :meth:`Source.read_depth` for one frame that cannot be used (e.g. a mask stored
    where depth should be): the builder drops that frame with a warning and keeps the scene."""


def check_rotation(R: np.ndarray, where: str, atol: float = 1e-3) -> np.ndarray:
    """``R`` as a float64 3x3 rotation (orthonormal within ``atol``, det > 0); ``ValueError``
    starting with ``where`` (the file and scene) otherwise."""
    R = np.asarray(R, np.float64)
    if (R.shape != (3, 3) or not np.all(np.isfinite(R))
            or not np.allclose(R @ R.T, np.eye(3), atol=atol) or np.linalg.det(R) <= 0):
        raise ValueError(f"{where}: not a rotation matrix: {R.tolist()}")
    return R


SOURCES: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make ``cls`` available as ``data.sources[i].kind: <cls.kind>``."""
    if not cls.kind or cls.kind in SOURCES:
        raise ValueError(f"source kind {cls.kind!r} is empty or already registered")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"source kind {cls.kind!r}: Options must be a dataclass")
    SOURCES[cls.kind] = cls
    return cls


def make_source(params: SourceParams, where: str = "data.sources") -> Source:
    """The source of ``params.kind``; ``ValueError`` listing the known kinds otherwise."""
    if params.kind not in SOURCES:
        raise ValueError(f"{where}: unknown kind {params.kind!r}; known: "
                         f"{', '.join(sorted(SOURCES))}")
    return SOURCES[params.kind].from_params(params, where)


def subfolders(source: Source, root: Path | None = None) -> list[Path]:
    """Sub-folders of ``root`` (default: the source root); hidden entries are ignored, loose
    files warned about."""
    out = []
    for path in sorted((root or source.root).iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            out.append(path)
        else:
            source.warn(f"{path}: not a scene folder, skipped")
    return out


def rigid(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The 4x4 ``[R t; 0 1]``."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(R, np.float64).reshape(3, 3)
    T[:3, 3] = np.asarray(t, np.float64).reshape(3)
    return T




def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """``K`` from focal lengths and principal point (pixels, pixel centres at integers)."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
