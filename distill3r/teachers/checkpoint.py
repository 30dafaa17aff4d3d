"""A saved Distill3R model as the teacher (``teacher.name: checkpoint``).

``teacher.checkpoint`` is a model folder written by the train stage (``model.safetensors`` +
``config.json``; loaded with its weights fingerprint checked). The teacher sees exactly the
cache views (the model's input at the cache resolution, which must be a multiple of its patch
size) and its four maps are cached as they come out of the model: ``xyz_global`` in view 0's
camera frame, ``xyz_local`` per view, confidences ``1 + exp(.)``; the mask keeps finite pixels
whose global and local confidences exceed ``teacher.conf_threshold``. The model runs in eval mode
(image indices 0..N-1: deterministic) under autocast in ``teacher.dtype`` where the device has
it. The fingerprint is built from the weights hash, so another model never passes for this one,
and from the hash of the code that runs it (:func:`model_code_digest`): the root pipeline's
``cache`` stage does not list the student's code among its deps (a student edit must not rerun
a Fast3R cache), so a cache built before a model-code change is refused by the train stage
instead of being used silently.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from distill3r.config import TeacherParams, to_dict
from distill3r.teachers.base import Teacher, TeacherInput, TeacherOutput, params_digest

VERSION = 2  # 2: the fingerprint includes model_code_digest()
MAPS = ("xyz_global", "xyz_local", "conf_global", "conf_local")
PACKAGE = Path(__file__).resolve().parents[1]
# what turns a model folder into predictions, relative to the distill3r package
MODEL_CODE = ("models", "inputs.py", "devices.py")


def model_code_digest(package: Path | None = None) -> str:
    """sha256 (hex) of the code a checkpoint teacher runs: every ``.py`` file of ``MODEL_CODE``
    under ``package`` (default: this installation's ``distill3r``), path and contents, in sorted
    order, line endings normalised (a Windows checkout of the same commit gives the same
    digest)."""
    package = PACKAGE if package is None else package
    files: list[Path] = []
    for entry in MODEL_CODE:
        path = package / entry
        if path.is_dir():
            files.extend(path.rglob("*.py"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: part of the checkpoint teacher's code is missing")
    h = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.relative_to(package).as_posix()):
        h.update(file.relative_to(package).as_posix().encode() + b"\0")
        h.update(file.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()


class CheckpointTeacher(Teacher):
    """A trained student (or any model folder of this project) as the teacher."""

    name = "checkpoint"

    def __init__(self, params: TeacherParams, model: Any = None) -> None:
        self.params = params
        self.folder = Path(params.checkpoint)
        self._model = model
        self._device = None
        self._weights: str | None = None
        self._code: str | None = None

    def _load(self) -> Any:
        if self._model is None:
            from distill3r.devices import resolve_device
            from distill3r.models import load_student

            if not self.folder.is_dir():
                raise ValueError(f"{self.folder}: teacher.checkpoint is not a model folder "
                                 "(expected model.safetensors and config.json)")
            self._device = resolve_device(self.params.device)
            try:
                self._model = load_student(self.folder, device=self._device).eval()
            except ValueError as exc:
                raise ValueError(f"cannot load the teacher from {self.folder}: {exc}") from exc
        return self._model

    def weights(self) -> str:
        """The weights fingerprint recorded (and checked at load) in ``config.json``."""
        if self._weights is None:
            from distill3r.models import checkpoint_fingerprint

            fp = checkpoint_fingerprint(self.folder)
            if fp is None:
                raise ValueError(f"{self.folder / 'config.json'}: no weights fingerprint "
                                 "(sha256): not a model folder written by the train stage")
            self._weights = fp
        return self._weights

    def code(self) -> str:
        """:func:`model_code_digest` of this installation (computed once)."""
        if self._code is None:
            self._code = model_code_digest()
        return self._code

    def fingerprint(self) -> str:
        p = self.params
        relevant = {"weights": self.weights(), "code": self.code(), "dtype": p.dtype,
                    "conf_threshold": p.conf_threshold}
        return f"{self.name}-v{VERSION}-{params_digest(relevant)}"

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint(), "version": VERSION,
                "weights": self.weights(), "code": self.code(), "params": to_dict(self.params)}

    def predict(self, batch: TeacherInput) -> TeacherOutput:
        import torch

        from distill3r.devices import autocast, bf16_supported, parse_dtype
        from distill3r.inputs import images_to_input

        model = self._load()
        patch = int(model.patch_size)
        h, w = batch.size
        if h % patch or w % patch:
            raise ValueError(f"teacher {str(self.folder)!r}: cache image size {h}x{w} is not a "
                             f"multiple of its patch size {patch} (set cache.image_size)")
        device = next(model.parameters()).device
        dtype = parse_dtype(self.params.dtype)
        if dtype == torch.bfloat16 and not bf16_supported(device):
            dtype = torch.float32
        x = images_to_input(torch.from_numpy(batch.images).to(device))[None]
        with torch.inference_mode(), autocast(device, dtype):
            out = model(x)
        maps = {k: out[k][0].float().cpu().numpy() for k in MAPS}
        return to_teacher_output(maps, self.params.conf_threshold)


def to_teacher_output(maps: dict[str, np.ndarray], conf_threshold: float) -> TeacherOutput:
    """Model maps (float32, no batch axis) -> :class:`TeacherOutput`: non-finite pixels get
    zero points and confidence 1 and are masked."""
    finite = (np.isfinite(maps["xyz_global"]).all(-1) & np.isfinite(maps["xyz_local"]).all(-1)
              & np.isfinite(maps["conf_global"]) & np.isfinite(maps["conf_local"]))
    clean = {}
    for k in MAPS:
        fill = 0.0 if k.startswith("xyz") else 1.0
        keep = finite[..., None] if k.startswith("xyz") else finite
        clean[k] = np.where(keep, maps[k], fill).astype(np.float32)
    for k in ("conf_global", "conf_local"):
        clean[k] = np.maximum(clean[k], 1.0)
    mask = finite & (clean["conf_global"] > conf_threshold) & (clean["conf_local"] > conf_threshold)
    return TeacherOutput(mask=mask, **clean)
