"""Save and load a student as ``model.safetensors`` + ``config.json`` (no pickle anywhere).

``config.json`` = ``{"format": "distill3r-student", "config": StudentConfig.to_dict(),
"num_params": int, "sha256": fingerprint}``; the fingerprint is the SHA-256 over the sorted
tensor names, dtypes, shapes and bytes of the weights (:func:`weights_fingerprint`), checked
on load so a weights file that does not belong to the config is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distill3r.jsonio import read_json, write_json
from distill3r.models.configs import StudentConfig
from distill3r.models.statedict import check_state_dict
from distill3r.models.student import Student

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "distill3r-student"


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 hex digest of a state dict (names, dtypes, shapes and raw bytes, sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def save_student(model: Student, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.config.to_dict(),
            "num_params": sum(p.numel() for p in model.parameters()),
            "sha256": weights_fingerprint(state)}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": FORMAT})
    write_json(out_dir / CONFIG_FILE, meta)
    return out_dir


def _read_meta(path: Path) -> dict:
    meta = read_json(path, "student config")
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path}: not a {FORMAT} config (needs 'format' and 'config')")
    return meta


def load_student(path_dir: str | Path, device: str | torch.device = "cpu",
                 head_chunk_size: int = 8) -> Student:
    """An eval-mode :class:`Student` from a folder written by :func:`save_student`."""
    path_dir = Path(path_dir)
    meta = _read_meta(path_dir / CONFIG_FILE)
    try:
        config = StudentConfig.from_dict(meta["config"])
    except ValueError as exc:
        raise ValueError(f"{path_dir / CONFIG_FILE}: {exc}") from exc
    weights = path_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{weights}: student weights not found")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights}: not a readable safetensors file: {exc}") from exc
    model = Student(config, head_chunk_size=head_chunk_size)
    check_state_dict(model, state, str(weights))
    if "sha256" in meta and weights_fingerprint(state) != meta["sha256"]:
        raise ValueError(f"{weights}: weights fingerprint does not match {CONFIG_FILE}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def checkpoint_fingerprint(checkpoint: str | Path) -> str | None:
    """The weights fingerprint recorded in a student folder's ``config.json`` (None if the
    file is missing, unreadable or has none)."""
    try:
        return read_json(Path(checkpoint) / "config.json").get("sha256")
    except ValueError:
        return None
