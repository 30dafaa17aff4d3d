"""The cache sample format: encode one sample to WebDataset members and decode it back.

One WebDataset sample = one multi-view sample, members:
- ``teacher.npz``: ``xyz_global``, ``xyz_local`` float16 ``[N,H,W,3]``; ``conf_global``,
  ``conf_local`` float16 ``[N,H,W]`` clamped to ``[1, conf_max]`` (finite in float16);
  ``mask_rle`` int32 1-D + ``mask_shape`` int64 ``[3]`` (see ``rle.py``);
- ``images.npz``: ``images`` uint8 ``[N,H,W,3]``;
- ``gt.npz`` (when the source has ground truth): ``depth`` float32 ``[N,H,W]`` (0 invalid),
  ``K`` float32 ``[N,3,3]`` (cache resolution), ``c2w`` float32 ``[N,4,4]``;
- ``meta.json``: dataset, scene, split, frames, teacher name/fingerprint, image_size, ...
The npz members are ordinary compressed npz files (what ``np.savez_compressed`` writes) with
fixed zip timestamps, so identical arrays give identical bytes. Reading never unpickles.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

import numpy as np

from distill3r.cache.rle import rle_decode, rle_encode
from distill3r.teachers.base import TeacherOutput

FORMAT = "distill3r-cache/1"  # index.json "format"
INDEX_NAME = "index.json"
FLOAT16_MAX = float(np.finfo(np.float16).max)
TEACHER_ARRAYS = ("xyz_global", "xyz_local", "conf_global", "conf_local", "mask_rle", "mask_shape")
GT_ARRAYS = ("depth", "K", "c2w")
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Compressed npz of ``arrays`` (no pickles, reproducible bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def sample_nbytes_bound(n: int, h: int, w: int, has_gt: bool = True) -> int:
    """An upper bound of one encoded sample's size in a tar (uncompressed payload + headers)."""
    px = n * h * w
    payload = px * (3 * 2 * 2 + 2 * 2 + 3 + 4) + 8 * (px + 1) + n * (9 + 16) * 4
    return payload + 16 * 1024  # npz/zip headers, meta.json, tar headers and padding


def encode_sample(key: str, teacher_out: TeacherOutput, images: np.ndarray,
                  gt: dict[str, np.ndarray] | None, meta: dict[str, Any],
                  conf_max: float = 60000.0) -> dict[str, Any]:
    """Validate and encode one sample to ``{"__key__": key, "<member>": bytes, ...}``.

    Args:
        key: ``[A-Za-z0-9_-]+`` (WebDataset splits member names at the first dot).
        teacher_out: float32 maps at the cache resolution (``TeacherOutput``).
        images: uint8 ``[N,H,W,3]``.
        gt: ``{"depth": [N,H,W], "K": [N,3,3], "c2w": [N,4,4]}`` or None.
        meta: JSON-serialisable dict.
        conf_max: confidences are clamped to ``[1, conf_max]``; at most float16's max.
    """
    where = f"sample {key!r}"
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"{where}: keys may only contain letters, digits, '_' and '-'")
    if not 1.0 <= conf_max <= FLOAT16_MAX:
        raise ValueError(f"cache.conf_max must be in [1, {FLOAT16_MAX}], got {conf_max}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: images must be uint8 [N,H,W,3], got {images.dtype} "
                         f"{list(images.shape)}")
    n, h, w = images.shape[:3]
    teacher_out.validate(n, (h, w), f"{where} teacher output")
    for name in ("xyz_global", "xyz_local"):
        if np.abs(getattr(teacher_out, name)).max(initial=0.0) > FLOAT16_MAX:
            raise ValueError(f"{where}: {name} exceeds the float16 range (|x| > {FLOAT16_MAX})")
    arrays = {
        "xyz_global": teacher_out.xyz_global.astype(np.float16),
        "xyz_local": teacher_out.xyz_local.astype(np.float16),
        "conf_global": np.clip(teacher_out.conf_global, 1.0, conf_max).astype(np.float16),
        "conf_local": np.clip(teacher_out.conf_local, 1.0, conf_max).astype(np.float16),
        "mask_rle": rle_encode(teacher_out.mask),
        "mask_shape": np.asarray(teacher_out.mask.shape, np.int64),
    }
    sample = {"__key__": key, "teacher.npz": npz_bytes(arrays),
              "images.npz": npz_bytes({"images": images})}
    if gt is not None:
        shapes = {"depth": (n, h, w), "K": (n, 3, 3), "c2w": (n, 4, 4)}
        gt32 = {}
        for name, shape in shapes.items():
            a = np.asarray(gt.get(name), dtype=np.float32) if gt.get(name) is not None else None
            if a is None or a.shape != shape or not np.all(np.isfinite(a)):
                raise ValueError(f"{where}: gt {name} must be finite with shape {list(shape)}")
            gt32[name] = a
        sample["gt.npz"] = npz_bytes(gt32)
    sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


def read_json_or_none(path) -> dict | None:
    """A JSON file's content, or None if missing or invalid."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
def _load_npz(raw: dict, member: str, where: str) -> dict[str, np.ndarray]:
    data = raw[member]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where}: member {member} is {type(data).__name__}, expected raw bytes "
                         "(do not add a WebDataset .decode() stage)")
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{where}: member {member} is not a readable npz: {exc}") from exc


def _expect(arrays: dict, name: str, dtype, shape: tuple, member: str, where: str) -> np.ndarray:
    if name not in arrays:
        raise ValueError(f"{where}: {member} has no array {name!r}")
    a = arrays[name]
    if a.dtype != dtype or a.shape != shape:
        raise ValueError(f"{where}: {member}:{name} must be {np.dtype(dtype)} {list(shape)}, "
                         f"got {a.dtype} {list(a.shape)}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: {member}:{name} has non-finite values")
    return a


def decode_sample(raw: dict) -> dict[str, Any]:
    """A raw WebDataset sample (bytes members) -> tensors (what the cache readers return).

    Returns ``key``, ``images`` float32 ``[N,3,H,W]`` in [0,1], ``xyz_global``/``xyz_local``
    float32 ``[N,H,W,3]``, ``conf_global``/``conf_local`` float32 ``[N,H,W]``, ``mask`` bool
    ``[N,H,W]``, ``meta`` dict and, with ground truth, ``depth``, ``K``, ``c2w`` (float32).
    Raises ``ValueError`` naming the shard (``__url__``) and key for any corrupt sample.
    """
    import torch

    where = f"{raw.get('__url__', '<unknown shard>')}: sample {raw.get('__key__', '<no key>')}"
    for member in ("teacher.npz", "images.npz", "meta.json"):
        if member not in raw:
            raise ValueError(f"{where}: missing member {member} (incomplete or foreign sample)")
    images = _load_npz(raw, "images.npz", where).get("images")
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: images.npz:images must be uint8 [N,H,W,3]")
    n, h, w = images.shape[:3]
    t = _load_npz(raw, "teacher.npz", where)
    out: dict[str, Any] = {"key": raw.get("__key__")}
    for name in ("xyz_global", "xyz_local"):
        out[name] = _expect(t, name, np.float16, (n, h, w, 3), "teacher.npz", where)
    for name in ("conf_global", "conf_local"):
        out[name] = _expect(t, name, np.float16, (n, h, w), "teacher.npz", where)
        if np.any(out[name] < 1):
            raise ValueError(f"{where}: teacher.npz:{name} has values below 1")
    if "mask_rle" not in t or "mask_shape" not in t:
        raise ValueError(f"{where}: teacher.npz has no mask_rle/mask_shape")
    try:
        mask = rle_decode(t["mask_rle"], t["mask_shape"])
    except ValueError as exc:
        raise ValueError(f"{where}: teacher.npz mask: {exc}") from exc
    if mask.shape != (n, h, w):
        raise ValueError(f"{where}: mask shape {list(mask.shape)} != images {[n, h, w]}")
    try:
        meta = json.loads(bytes(raw["meta.json"]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: meta.json is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta.json must hold an object")
    result = {"key": out["key"],
              "images": torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)}
    for name in ("xyz_global", "xyz_local", "conf_global", "conf_local"):
        result[name] = torch.from_numpy(out[name].astype(np.float32))
    result["mask"] = torch.from_numpy(mask)
    if "gt.npz" in raw:
        g = _load_npz(raw, "gt.npz", where)
        shapes = {"depth": (n, h, w), "K": (n, 3, 3), "c2w": (n, 4, 4)}
        for name, shape in shapes.items():
            result[name] = torch.from_numpy(_expect(g, name, np.float32, shape, "gt.npz", where))
    result["meta"] = meta
    return result
