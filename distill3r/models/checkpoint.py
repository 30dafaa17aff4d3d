"""Save and load a student as ``model.safetensors`` + ``config.json`` (no pickle anywhere).

``config.json`` = ``{"format": "distill3r-student", "config": StudentConfig.to_dict(),
"num_params": int, "sha256": fingerprint}``; the fingerprint is the SHA-256 over the sorted
tensor names, dtypes, shapes and bytes of the weights (:func:`weights_fingerprint`), required
and checked on load so a weights file that does not belong to the config is refused.

Saving is atomic for the folder: both files are written to a temporary sibling folder that
then replaces the old one in one step (``atomic.replace_dir``). Loading checks, before
anything is allocated, the config file's size, every architecture field against an upper
bound (:data:`CONFIG_BOUNDS`), the parameter count of the model built on PyTorch's ``meta``
device (no memory), and every tensor of the safetensors header (names, dtypes, shapes, byte
ranges, file size) against that model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distill3r.atomic import replace_dir
from distill3r.jsonio import read_json
from distill3r.models.configs import StudentConfig
from distill3r.models.statedict import check_state_dict
from distill3r.models.student import Student

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "distill3r-student"
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20  # safetensors JSON header
MAX_PARAMS = 2_000_000_000  # fast3r-large (~648M) fits with room
# Upper bounds of the architecture fields, checked before a model is built.
CONFIG_BOUNDS = {"patch_size": 64, "img_size": 4096, "enc_dim": 4096, "enc_depth": 96,
                 "enc_heads": 128, "enc_mlp_ratio": 16, "enc_reg_tokens": 64, "dec_dim": 4096,
                 "dec_depth": 96, "dec_heads": 128, "dec_mlp_ratio": 16, "max_views": 100_000,
                 "dpt_feature_dim": 4096, "dpt_last_dim": 4096, "dpt_image_dim": 4096,
                 "dpt_image_blocks": 64, "dpt_image_full": 4096}
MAX_DPT_LAYER_DIM = 8192
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool,
           "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16}


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 hex digest of a state dict (names, dtypes, shapes and raw bytes, sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_student(model: Student, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` as one unit: a killed
    save leaves the previous folder or the new one, never a mix; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by killed saves
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        meta = {"format": FORMAT, "config": model.config.to_dict(),
                "num_params": sum(p.numel() for p in model.parameters()),
                "sha256": weights_fingerprint(state)}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for path in (tmp / WEIGHTS_FILE, tmp / CONFIG_FILE, tmp):
            _fsync(path)
        old = replace_dir(tmp, out_dir, out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-old")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _read_meta(path: Path) -> dict:
    if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a student config")
    meta = read_json(path, "student config")
    if meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: not a {FORMAT} config (needs 'format' and 'config')")
    sha = meta.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ValueError(f"{path}: no weights fingerprint ('sha256'): the weights cannot be "
                         "checked against this config (save the student again)")
    return meta


def check_config_bounds(config: dict[str, Any], where: str) -> None:
    """``ValueError`` naming the field when an architecture field exceeds its upper bound."""
    for key, bound in CONFIG_BOUNDS.items():
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > bound:
            raise ValueError(f"{where}: config {key}={value} exceeds the bound {bound}")
    dims = config.get("dpt_layer_dims")
    if isinstance(dims, list) and any(isinstance(d, int) and d > MAX_DPT_LAYER_DIM
                                      for d in dims):
        raise ValueError(f"{where}: config dpt_layer_dims {dims} exceed {MAX_DPT_LAYER_DIM}")


def _header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header (its byte ranges checked against the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: safetensors header of {length} bytes is larger than the "
                             "file or the limit")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path}: safetensors header is not JSON: {exc!r}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not an object")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and \
            isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
        if not ok:
            raise ValueError(f"{path}: safetensors entry {name!r} is malformed")
        end = max(end, *[int(o) for o in entry["data_offsets"]])
    if 8 + length + end != size:
        raise ValueError(f"{path}: the header's tensors span {end} bytes but the file holds "
                         f"{size - 8 - length}")
    return header


def _check_header(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """``ValueError`` unless the file's tensors are exactly ``expected``'s names, dtypes and
    shapes, each with a byte range of the right length."""
    header = _header(path)
    problems, mismatched = [], []
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:10])}")
    for name in sorted(set(expected) & set(header)):
        entry, want = header[name], expected[name]
        dtype = _DTYPES.get(entry.get("dtype"))
        shape = entry["shape"]
        start, stop = (int(o) for o in entry["data_offsets"])
        count = 1
        for s in shape:
            count *= int(s) if isinstance(s, int) and s >= 0 else -1
        if dtype != want.dtype or list(want.shape) != shape or \
                stop - start != count * want.element_size():
            mismatched.append(f"{name} (file {entry.get('dtype')} {shape} vs model "
                              f"{want.dtype} {list(want.shape)})")
    if mismatched:
        problems.append(f"shape mismatches: {', '.join(mismatched[:10])}")
    if problems:
        raise ValueError(f"{path}: weights do not match the config; " + "; ".join(problems))


def load_student(path_dir: str | Path, device: str | torch.device = "cpu",
                 head_chunk_size: int = 8) -> Student:
    """An eval-mode :class:`Student` from a folder written by :func:`save_student`."""
    path_dir = Path(path_dir)
    meta = _read_meta(path_dir / CONFIG_FILE)
    check_config_bounds(meta["config"], str(path_dir / CONFIG_FILE))
    try:
        config = StudentConfig.from_dict(meta["config"])
    except ValueError as exc:
        raise ValueError(f"{path_dir / CONFIG_FILE}: {exc}") from exc
    weights = path_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{weights}: student weights not found")
    with torch.device("meta"):  # shapes only: nothing is allocated
        skeleton = Student(config, head_chunk_size=head_chunk_size)
    params = sum(p.numel() for p in skeleton.parameters())
    if params > MAX_PARAMS:
        raise ValueError(f"{path_dir / CONFIG_FILE}: the config describes {params} parameters, "
                         f"above the limit {MAX_PARAMS}")
    _check_header(weights, skeleton.state_dict())
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights}: not a readable safetensors file: {exc}") from exc
    model = Student(config, head_chunk_size=head_chunk_size)
    check_state_dict(model, state, str(weights))
    if weights_fingerprint(state) != meta["sha256"]:
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
