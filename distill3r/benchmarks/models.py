"""The model interface of the benchmarks: one sample in, the four maps out, at the sample's grid.

Every model implements :class:`BenchModel`: ``name``, ``multiple`` (the grid's sides must be
multiples of it: the student's patch size; 1 for models that take any size) and
``predict(BenchSample) -> {xyz_global, xyz_local [N,H,W,3], conf_global, conf_local [N,H,W]}``
(view 0's camera frame, any scale; NaN points are "no prediction"), scored by
:func:`distill3r.evaluation.protocol.evaluate_sample`. Implementations:

- ``student``: the trained student through :func:`distill3r.inference.predict`;
- ``fast3r``: the Fast3R teacher through its adapter (:class:`distill3r.teachers.fast3r.
  Fast3RTeacher`: it reads the source images, runs Fast3R at its own input size and maps the
  outputs back to the grid; pixels outside its mask are NaN, as ``evaluate`` scores teachers);
- ``groundtruth``: the ground-truth teacher (exact points from the benchmark's depth and poses:
  scores ~0 by construction, a check of the pipeline);
- ``plane``: fronto-parallel planes at each view's median depth (the ``evaluate`` baseline).
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np

from distill3r.benchmarks.sample import BenchSample
from distill3r.config import TeacherParams
from distill3r.data.io import write_image
from distill3r.evaluation.baselines import plane_baseline
from distill3r.teachers.base import TeacherInput, TeacherOutput

MODELS = ("student", "fast3r", "groundtruth", "plane")


class BenchModel(ABC):
    """A model the benchmarks can score (see the module docstring)."""

    name: str = "model"
    multiple: int = 1

    @abstractmethod
    def predict(self, sample: BenchSample) -> dict[str, np.ndarray]:
        """The four maps of ``sample`` at ``sample.size``."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def teacher_maps(out: TeacherOutput) -> dict[str, np.ndarray]:
    """A teacher's output as a prediction: points outside its mask are NaN."""
    pred = {k: np.asarray(getattr(out, k), np.float64) for k in
            ("xyz_global", "xyz_local", "conf_global", "conf_local")}
    for k in ("xyz_global", "xyz_local"):
        pred[k][~out.mask] = np.nan
    return pred


class PlaneModel(BenchModel):
    name = "plane"

    def predict(self, sample: BenchSample) -> dict[str, np.ndarray]:
        return plane_baseline(sample.depth, sample.K)


class GroundTruthModel(BenchModel):
    name = "groundtruth"

    def __init__(self, params: TeacherParams | None = None):
        from distill3r.teachers.groundtruth import GroundTruthTeacher

        self.teacher = GroundTruthTeacher(params or TeacherParams())

    def predict(self, sample: BenchSample) -> dict[str, np.ndarray]:
        batch = TeacherInput(images=sample.images, depth=sample.depth.astype(np.float32),
                             K=sample.K.astype(np.float64), c2w=sample.c2w.astype(np.float64),
                             key=sample.key)
        return teacher_maps(self.teacher.predict(batch))


class StudentModel(BenchModel):
    """The trained student (``models/student``), run by the inference module's ``predict``."""

    name = "student"

    def __init__(self, checkpoint: str | Path, device: str = "auto", dtype: str = "bf16"):
        import torch

        from distill3r.devices import bf16_supported, parse_dtype, resolve_device
        from distill3r.models import load_student

        path = Path(checkpoint)
        if not path.is_dir():
            raise ValueError(f"{path}: student checkpoint folder not found (run the train "
                             "stage, or drop 'student' from benchmark.models)")
        self.device = resolve_device(device)
        self.dtype = parse_dtype(dtype)
        if self.dtype == torch.bfloat16 and not bf16_supported(self.device):
            self.dtype = torch.float32
        self.model = load_student(path, device=self.device).eval()
        self.multiple = int(self.model.patch_size)
        self.checkpoint = path

    def predict(self, sample: BenchSample) -> dict[str, np.ndarray]:
        from distill3r.inference import predict

        return predict(self.model, sample.images, self.device, self.dtype)

    def describe(self) -> dict[str, Any]:
        from distill3r.models import checkpoint_fingerprint

        return {"name": self.name, "config": self.model.config.name,
                "checkpoint": checkpoint_fingerprint(self.checkpoint),
                "dtype": str(self.dtype).replace("torch.", "")}


class Fast3RModel(BenchModel):
    """Fast3R through the teacher adapter. ``model``/``inference_fn`` may be injected (a
    stand-in module with Fast3R's output structure); otherwise the adapter loads
    ``params.checkpoint`` on first use (needs the fast3r package and, in practice, a GPU)."""

    name = "fast3r"

    def __init__(self, params: TeacherParams, model: Any = None,
                 inference_fn: Callable | None = None, weights_id: str | None = None):
        from distill3r.teachers.fast3r import Fast3RTeacher

        self.teacher = Fast3RTeacher(params, model=model, inference_fn=inference_fn,
                                     weights_id=weights_id)

    def predict(self, sample: BenchSample) -> dict[str, np.ndarray]:
        # the adapter preprocesses from source images on disk: hand it the exact sources
        with tempfile.TemporaryDirectory(prefix="distill3r-bench-") as tmp:
            paths = []
            for i, rgb in enumerate(sample.sources):
                paths.append(Path(tmp) / f"view{i:04d}.png")
                write_image(paths[-1], rgb)
            batch = TeacherInput(images=sample.images, image_paths=paths, key=sample.key)
            return teacher_maps(self.teacher.predict(batch))

    def describe(self) -> dict[str, Any]:
        return self.teacher.describe()


def build_model(name: str, checkpoint: str | Path | None, teacher: TeacherParams,
                device: str = "auto", dtype: str = "bf16") -> BenchModel:
    """The model called ``name`` (one of :data:`MODELS`)."""
    if name == "student":
        if checkpoint is None:
            raise ValueError("benchmark model 'student' needs --checkpoint")
        return StudentModel(checkpoint, device, dtype)
    if name == "fast3r":
        return Fast3RModel(teacher)
    if name == "groundtruth":
        return GroundTruthModel(teacher)
    if name == "plane":
        return PlaneModel()
    raise ValueError(f"unknown benchmark model {name!r} (known: {', '.join(MODELS)})")
