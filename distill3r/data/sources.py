"""Scene sources: the datasets the manifest is built from.

A source lists scenes; a scene is a list of frames (image path, optional depth path, optional
``K`` [3,3] pixels and ``c2w`` [4,4] OpenCV camera-to-world). Adding a dataset is one class::

    @register_source
    class CO3DSource(Source):
        kind = "co3d"                      # params.yaml: data.sources[i].kind
        def list_scenes(self) -> list[Scene]:
            ...                            # read the dataset's own files under self.root

The base class checks the root folder, that every scene has frames, unique frame ids,
existing files and well-formed ``K``/``c2w`` (``ValueError`` naming the path), and sorts.
Sampling, splits, resizing and the short-scene report are the manifest builder's job
(``distill3r/data/build.py``), so a source only translates a dataset's layout.
Depth files must be readable by ``distill3r.data.io.read_depth`` (16-bit PNG at 0.1 mm or
``.npy`` metres); a source whose depth uses another unit converts it.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from distill3r.config import SourceParams
from distill3r.data.io import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass
class Frame:
    """One view of a scene as the source provides it (any resolution)."""

    frame: int
    image: Path
    depth: Path | None = None
    K: np.ndarray | None = None  # [3,3] float64, pixels, matching ``image``
    c2w: np.ndarray | None = None  # [4,4] float64, OpenCV camera-to-world


@dataclass
class Scene:
    name: str
    path: Path  # the scene's folder or file (named in error messages)
    frames: list[Frame] = field(default_factory=list)


class Source(ABC):
    """Base class of every dataset reader; subclasses set ``kind`` and implement
    :meth:`list_scenes`. Use :meth:`scenes` (validated, sorted) rather than calling it."""

    kind: ClassVar[str] = ""

    def __init__(self, root: str | Path, name: str | None = None):
        self.root = Path(root)
        self.name = name or self.kind
        self.warnings: list[str] = []  # skipped files etc., for the manifest report

    @classmethod
    def from_params(cls, params: SourceParams) -> "Source":
        return cls(params.root, params.name)

    @abstractmethod
    def list_scenes(self) -> list[Scene]:
        """All scenes under ``self.root`` with their frames (the one method to implement)."""

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def scenes(self) -> list[Scene]:
        """Validated scenes sorted by name, frames sorted by index."""
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: source folder not found (data.sources kind "
                             f"{self.kind!r})")
        scenes = sorted(self.list_scenes(), key=lambda s: s.name)
        if not scenes:
            raise ValueError(f"{self.root}: no scenes found for source kind {self.kind!r}")
        names = [s.name for s in scenes]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.root}: duplicate scene names")
        for scene in scenes:
            _check_scene(scene)
            scene.frames.sort(key=lambda f: f.frame)
        return scenes


def _check_scene(scene: Scene) -> None:
    if not scene.frames:
        raise ValueError(f"{scene.path}: empty scene (no frames)")
    ids = [f.frame for f in scene.frames]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{scene.path}: duplicate frame indices")
    for f in scene.frames:
        if not Path(f.image).is_file():
            raise ValueError(f"{f.image}: image file not found (scene {scene.path})")
        if f.depth is not None and not Path(f.depth).is_file():
            raise ValueError(f"{f.depth}: depth file not found (scene {scene.path})")
        if f.K is not None:
            K = np.asarray(f.K, np.float64)
            if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
                raise ValueError(f"{f.image}: K must be a finite 3x3 with positive focal lengths")
            f.K = K
        if f.c2w is not None:
            T = np.asarray(f.c2w, np.float64)
            if (T.shape != (4, 4) or not np.all(np.isfinite(T))
                    or not np.allclose(T[3], [0, 0, 0, 1])):
                raise ValueError(f"{f.image}: c2w must be a finite 4x4 with last row 0 0 0 1")
            f.c2w = T


SOURCES: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make ``cls`` available as ``data.sources[i].kind: <cls.kind>``."""
    if not cls.kind or cls.kind in SOURCES:
        raise ValueError(f"source kind {cls.kind!r} is empty or already registered")
    SOURCES[cls.kind] = cls
    return cls


def make_source(params: SourceParams) -> Source:
    """The source of ``params.kind``; ``ValueError`` listing the known kinds otherwise."""
    if params.kind not in SOURCES:
        raise ValueError(f"data.sources: unknown kind {params.kind!r}; known: "
                         f"{', '.join(sorted(SOURCES))}")
    return SOURCES[params.kind].from_params(params)


def _subfolders(source: Source) -> list[Path]:
    """Scene folders under the root; hidden entries are ignored, loose files warned about."""
    out = []
    for path in sorted(source.root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            out.append(path)
        else:
            source.warn(f"{path}: not a scene folder, skipped")
    return out


@register_source
class DemoSource(Source):
    """The built-in demo renders (``distill3r.data.demo``): ``<root>/<scene>/cameras.json``
    with rgb/depth PNGs, K and OpenCV c2w per frame."""

    kind = "demo"

    def list_scenes(self) -> list[Scene]:
        scenes = []
        for folder in _subfolders(self):
            path = folder / "cameras.json"
            if not path.is_file():
                raise ValueError(f"{folder}: not a demo scene (no cameras.json)")
            try:
                frames = [Frame(frame=int(f["frame"]), image=folder / f["image"],
                                depth=(folder / f["depth"]) if f.get("depth") else None,
                                K=np.asarray(f["K"], np.float64),
                                c2w=np.asarray(f["c2w"], np.float64))
                          for f in json.loads(path.read_text())["frames"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: malformed cameras file: {exc!r}") from exc
            scenes.append(Scene(folder.name, folder, frames))
        return scenes


@register_source
class ImageFolderSource(Source):
    """A folder of scenes, each a folder of images (no ground truth). Frames are the images
    sorted by file name (plain string order: zero-pad numbers); other files are skipped."""

    kind = "images"

    def list_scenes(self) -> list[Scene]:
        scenes = []
        for folder in _subfolders(self):
            images = []
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(path)
                else:
                    self.warn(f"{path}: not an image file, skipped")
            scenes.append(Scene(folder.name, folder,
                                [Frame(frame=i, image=p) for i, p in enumerate(images)]))
        return scenes
