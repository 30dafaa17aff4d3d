"""The manifest: one CSV row per frame, the single input of the cache stage.

Columns: ``dataset, split, scene, frame, image, depth, K, c2w``.
``image``/``depth`` are paths relative to the manifest file's folder (``depth`` empty when the
source has none); ``K`` is 9 space-separated floats (row-major 3x3, pixels, matching the image
file the row points to), ``c2w`` 16 floats (row-major 4x4 OpenCV camera-to-world); both empty
when absent. ``split`` is ``train`` or ``val``.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill3r.atomic import replacing

COLUMNS = ("dataset", "split", "scene", "frame", "image", "depth", "K", "c2w")
SPLITS = ("train", "val")


@dataclass
class FrameRecord:
    """One frame of one scene. Paths are absolute once read from a manifest."""

    dataset: str
    split: str
    scene: str
    frame: int
    image: Path
    depth: Path | None = None
    K: np.ndarray | None = None  # [3,3] float64
    c2w: np.ndarray | None = None  # [4,4] float64

    @property
    def scene_key(self) -> tuple[str, str, str]:
        return (self.dataset, self.split, self.scene)


def _fmt(array: np.ndarray | None) -> str:
    if array is None:
        return ""
    return " ".join(repr(float(x)) for x in np.asarray(array, np.float64).reshape(-1))


def _parse(text: str, shape: tuple[int, ...], what: str, where: str) -> np.ndarray | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = np.array([float(x) for x in text.split()], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{where}: column {what} is not a list of numbers: {text!r}") from exc
    if values.size != int(np.prod(shape)) or not np.all(np.isfinite(values)):
        raise ValueError(f"{where}: column {what} needs {int(np.prod(shape))} finite numbers, "
                         f"got {values.size}")
    return values.reshape(shape)


def write_manifest(records: list[FrameRecord], path: str | Path) -> None:
    """Write ``records`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in records:
            depth = "" if r.depth is None else os.path.relpath(Path(r.depth).resolve(), base)
            writer.writerow([r.dataset, r.split, r.scene, int(r.frame),
                             os.path.relpath(Path(r.image).resolve(), base), depth,
                             _fmt(r.K), _fmt(r.c2w)])


def read_manifest(path: str | Path) -> list[FrameRecord]:
    """Read a manifest; ``ValueError`` naming the file and line for any malformed row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found (run the manifest stage first)")
    base = path.parent.resolve()
    records = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            if row["split"] not in SPLITS:
                raise ValueError(f"{where}: split must be one of {SPLITS}, got {row['split']!r}")
            try:
                frame = int(row["frame"])
            except ValueError as exc:
                raise ValueError(f"{where}: frame is not an integer: {row['frame']!r}") from exc
            if not row["image"]:
                raise ValueError(f"{where}: empty image path")
            records.append(FrameRecord(
                dataset=row["dataset"], split=row["split"], scene=row["scene"], frame=frame,
                image=Path(os.path.normpath(base / row["image"])),
                depth=Path(os.path.normpath(base / row["depth"])) if row["depth"] else None,
                K=_parse(row["K"], (3, 3), "K", where),
                c2w=_parse(row["c2w"], (4, 4), "c2w", where),
            ))
    return records


def group_scenes(records: list[FrameRecord]) -> dict[tuple[str, str, str], list[FrameRecord]]:
    """Records grouped by ``(dataset, split, scene)``, frames sorted by index, keys sorted."""
    groups: dict[tuple[str, str, str], list[FrameRecord]] = defaultdict(list)
    for r in records:
        groups[r.scene_key].append(r)
    return {k: sorted(groups[k], key=lambda r: r.frame) for k in sorted(groups)}
