"""The teacher interface: views in, the four maps out, at the cache resolution.

Every teacher implements :class:`Teacher`: ``name``, ``fingerprint()`` (a stable string that
changes whenever the teacher's outputs could change: name, parameters, weights identity, and the
hash of this project's code where the teacher runs it, as the checkpoint teacher does) and
``predict(TeacherInput) -> TeacherOutput``. Conventions: OpenCV cameras, ``c2w``
camera-to-world, global frame = view 0's camera frame, views-first arrays.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def _check(name: str, array: np.ndarray | None, shape: tuple, dtype, where: str) -> None:
    """``shape`` may contain ``None`` for free dimensions."""
    if array is None:
        return
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{where}: {name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise ValueError(f"{where}: {name} must be {np.dtype(dtype)}, got {array.dtype}")
    fits = array.ndim == len(shape) and all(s is None or s == a
                                            for s, a in zip(shape, array.shape))
    if not fits:
        want = "[" + ",".join("?" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{where}: {name} must have shape {want}, got {list(array.shape)}")


@dataclass
class TeacherInput:
    """One multi-view sample for a teacher.

    Attributes:
        images: uint8 ``[N,H,W,3]`` RGB at the cache resolution (exactly what the student sees).
        image_paths: the N source image files (for teachers that preprocess themselves).
        depth: optional float32 ``[N,H,W]`` metric z-depth at the cache resolution, 0 = invalid.
        K: optional float64 ``[N,3,3]`` intrinsics at the cache resolution.
        c2w: optional float64 ``[N,4,4]`` camera-to-world poses (source world frame).
        key: the sample key (for error messages and per-sample seeding).
    """

    images: np.ndarray
    image_paths: list[Path] = field(default_factory=list)
    depth: np.ndarray | None = None
    K: np.ndarray | None = None
    c2w: np.ndarray | None = None
    key: str = ""

    def __post_init__(self) -> None:
        where = f"teacher input {self.key!r}"
        _check("images", self.images, (None, None, None, 3), np.uint8, where)
        n, h, w = self.images.shape[:3]
        if self.image_paths and len(self.image_paths) != n:
            raise ValueError(f"{where}: {len(self.image_paths)} image paths for {n} views")
        _check("depth", self.depth, (n, h, w), np.float32, where)
        _check("K", self.K, (n, 3, 3), np.float64, where)
        _check("c2w", self.c2w, (n, 4, 4), np.float64, where)

    @property
    def num_views(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


@dataclass
class TeacherOutput:
    """Teacher predictions at the cache resolution.

    Attributes:
        xyz_global: float32 ``[N,H,W,3]`` points in view 0's camera frame.
        xyz_local: float32 ``[N,H,W,3]`` points in each view's own camera frame.
        conf_global, conf_local: float32 ``[N,H,W]`` confidences, >= 1 everywhere.
        mask: bool ``[N,H,W]`` pixels to supervise.
    All values are finite (invalid pixels hold zeros and confidence 1).
    """

    xyz_global: np.ndarray
    xyz_local: np.ndarray
    conf_global: np.ndarray
    conf_local: np.ndarray
    mask: np.ndarray

    def validate(self, num_views: int, size: tuple[int, int],
                 where: str = "teacher output") -> None:
        """Raise ``ValueError`` unless shapes, dtypes, finiteness and ``conf >= 1`` hold."""
        n, (h, w) = num_views, size
        _check("xyz_global", self.xyz_global, (n, h, w, 3), np.float32, where)
        _check("xyz_local", self.xyz_local, (n, h, w, 3), np.float32, where)
        _check("conf_global", self.conf_global, (n, h, w), np.float32, where)
        _check("conf_local", self.conf_local, (n, h, w), np.float32, where)
        _check("mask", self.mask, (n, h, w), np.bool_, where)
        for name in ("xyz_global", "xyz_local", "conf_global", "conf_local"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise ValueError(f"{where}: {name} has non-finite values")
        for name in ("conf_global", "conf_local"):
            if np.any(getattr(self, name) < 1):
                raise ValueError(f"{where}: {name} must be >= 1")


def params_digest(payload: Any) -> str:
    """A short stable hash of a JSON-serialisable payload (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Teacher(ABC):
    """A model (or ground truth) that produces the distillation targets."""

    name: str = "teacher"
    requires: tuple[str, ...] = ()  # manifest fields every frame needs: "depth", "K", "c2w"

    def check_frames(self, scenes: dict) -> None:
        """Before any teacher call: ``ValueError`` listing the scenes (``group_scenes`` keys
        ``(dataset, split, scene)`` -> frame records) whose frames lack a required field."""
        lacking = []
        for (dataset, _, scene), frames in scenes.items():
            missing = [f for f in self.requires
                       if any(getattr(r, f) is None for r in frames)]
            if missing:
                lacking.append(f"{dataset}/{scene} (no {', '.join(missing)})")
        if lacking:
            more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
            raise ValueError(
                f"teacher {self.name!r} needs {', '.join(self.requires)} for every frame, but "
                f"{len(lacking)} scene(s) lack them: {'; '.join(lacking[:5])}{more}. Use "
                "teacher.name: fast3r for sources without depth and poses, or drop them from "
                "data.sources")

    @abstractmethod
    def fingerprint(self) -> str:
        """Stable identity of everything that determines the outputs (name, params, weights, and
        this project's code where the teacher runs it)."""

    @abstractmethod
    def predict(self, batch: TeacherInput) -> TeacherOutput:
        """Predict the four maps and the mask for one sample, at ``batch.size``."""

    def describe(self) -> dict:
        """JSON-able description written into the cache index (override to add details)."""
        return {"name": self.name, "fingerprint": self.fingerprint()}
