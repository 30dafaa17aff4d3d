"""Ground truth for the dataset-source tests: rendered demo scenes, and the geometry check.

A source test renders a few demo scenes (:func:`render_truth`), writes them in its dataset's
real on-disk layout (file names, depth encoding, pose convention), builds the manifest through
the source, and calls :func:`geometry_error`: the ground-truth teacher's global point maps from
the manifest rows against the points the demo's exact depth, ``K`` and ``c2w`` give. A correct
reader scores ~1e-4 (depth quantisation); a swapped pose convention scores > 1e-2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from distill3r.cache.writer import load_sample
from distill3r.config import DataParams, DemoParams, SourceParams, TeacherParams
from distill3r.data.build import build_manifest
from distill3r.data.demo import render_demo
from distill3r.data.io import read_depth, read_image
from distill3r.data.manifest import FrameRecord, read_manifest
from distill3r.data.sampling import ViewSample
from distill3r.geometry import depth_to_camera_points, invert_pose, transform_points
from distill3r.teachers.groundtruth import GroundTruthTeacher

TOLERANCE = 1e-3  # median relative point error a correct reader stays below


@dataclass
class TruthFrame:
    index: int
    image: np.ndarray  # [H,W,3] uint8 RGB
    depth: np.ndarray  # [H,W] float32 metres, 0 = invalid
    K: np.ndarray  # [3,3] pixels, pixel centres at integers
    c2w: np.ndarray  # [4,4] OpenCV camera-to-world

    @property
    def w2c(self) -> np.ndarray:
        return invert_pose(self.c2w)


@dataclass
class TruthScene:
    name: str
    frames: list[TruthFrame]

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].depth.shape


def render_truth(root: Path, num_scenes: int = 2, views: int = 5, height: int = 48,
                 width: int = 64, seed: int = 11) -> list[TruthScene]:
    """Render demo scenes under ``root`` and load them back as exact ground truth."""
    params = DemoParams(num_scenes=num_scenes, views_per_scene=views, height=height,
                        width=width, seed=seed, workers=0)
    names = render_demo(root, params, progress=False)
    scenes = []
    for name in names:
        cams = json.loads((root / name / "cameras.json").read_text())
        frames = [TruthFrame(index=int(f["frame"]), image=read_image(root / name / f["image"]),
                             depth=read_depth(root / name / f["depth"]),
                             K=np.asarray(f["K"], np.float64),
                             c2w=np.asarray(f["c2w"], np.float64)) for f in cams["frames"]]
        scenes.append(TruthScene(name, frames))
    return scenes


def build(tmp_path: Path, kind: str, root: Path, options: dict | None = None,
          **data_kw) -> tuple[Path, dict]:
    """Build a manifest from one source; returns ``(manifest.csv, report)``."""
    params = DataParams(sources=[SourceParams(kind=kind, root=str(root), options=options or {})],
                        val_fraction=0.0, **data_kw)
    out = tmp_path / "manifest" / "manifest.csv"
    report = build_manifest(params, out, tmp_path / "manifest" / "images",
                            report_path=tmp_path / "manifest" / "report.json")
    return out, report


def scene_records(manifest_csv: Path, scene: str) -> list[FrameRecord]:
    """The manifest rows of ``scene`` in frame order."""
    rows = sorted((r for r in read_manifest(manifest_csv) if r.scene == scene),
                  key=lambda r: r.frame)
    assert rows, f"scene {scene!r} not in {manifest_csv}"
    return rows


def geometry_error(records: list[FrameRecord], truth: list[TruthFrame],
                   scale: float = 1.0, min_valid: float = 0.3) -> float:
    """Worst per-view median relative error of the ground-truth teacher's global points.

    Args:
        records: manifest rows of one scene (the order the source gave them).
        truth: the matching truth frames, same order.
        scale: world units of the dataset per metre (SfM datasets may be up to scale).
    """
    assert len(records) == len(truth) >= 2
    h, w = truth[0].depth.shape
    sample = ViewSample(key="check", dataset=records[0].dataset, split=records[0].split,
                        scene=records[0].scene, sample_id="s000", frames=list(records))
    batch, _ = load_sample(sample, (h, w))
    assert batch.depth is not None and batch.K is not None and batch.c2w is not None
    out = GroundTruthTeacher(TeacherParams()).predict(batch)
    w2c0 = truth[0].w2c
    worst = 0.0
    for j, t in enumerate(truth):
        expected = transform_points(w2c0 @ t.c2w, depth_to_camera_points(t.depth, t.K)) * scale
        valid = out.mask[j] & (t.depth > 0)
        if valid.mean() < min_valid:
            return float("inf")  # the reader lost most of the depth: as bad as wrong geometry
        err = np.linalg.norm(out.xyz_global[j] - expected, axis=-1)
        rel = err[valid] / np.linalg.norm(expected[valid], axis=-1)
        worst = max(worst, float(np.median(rel)))
    return worst


def check_images(records: list[FrameRecord], truth: list[TruthFrame], lossy: bool) -> None:
    """The manifest's images are the truth's (exactly, or within JPEG error)."""
    for r, t in zip(records, truth):
        image = read_image(r.image).astype(np.int16)
        diff = np.abs(image - t.image.astype(np.int16)).mean()
        assert diff < (20.0 if lossy else 1e-9), (r.image, diff)  # 4:2:0 JPEG of tiny views


def write_jpeg(path: Path, image: np.ndarray) -> None:
    """An RGB image as JPEG quality 95 without chroma subsampling: cv2's default 4:2:0 loses
    more than ``check_images`` allows on the fine texture of tiny demo views."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                             cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    assert ok, path
    path.write_bytes(data.tobytes())


def skipped_reasons(report: dict, expected: dict) -> dict[str, str]:
    """``{scene: reason}`` of ``report["skipped"]``; asserts the skipped scenes are exactly
    ``expected``'s keys and each reason names its file (``expected[scene]``) and the scene."""
    reasons = {s["scene"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == set(expected), (sorted(reasons), sorted(expected))
    for name, path in expected.items():
        assert str(path) in reasons[name] and f"scene {name}" in reasons[name], reasons[name]
    return reasons


def perturbed(truth: list[TruthScene], fn: Callable[[TruthFrame], TruthFrame]) -> list[TruthScene]:
    """A copy of ``truth`` with every frame passed through ``fn`` (to write wrong fixtures)."""
    return [TruthScene(s.name, [fn(f) for f in s.frames]) for s in truth]
