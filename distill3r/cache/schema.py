"""The cache sample format: encode to and decode from bytes.

One WebDataset sample = one multi-view sample, members:
- ``teacher.npz``: ``xyz_global``, ``xyz_local`` float16 ``[N,H,W,3]``; ``conf_global``,
  ``conf_local`` float16 ``[N,H,W]`` clamped to ``[1, conf_max]`` (finite in float16);
  ``mask_rle`` int32 1-D + ``mask_shape`` int64 ``[3]`` (see ``rle.py``);
- ``images.npz``: ``images`` uint8 ``[N,H,W,3]``;
- ``gt.npz`` (when the source has ground truth): ``depth`` float32 ``[N,H,W]`` (0 invalid),
  ``K`` float32 ``[N,3,3]`` (cache resolution), ``c2w`` float32 ``[N,4,4]``;
- ``meta.json``: dataset, scene, split, frames, teacher name/fingerprint, image_size, ...;
- ``sha256``: the hex SHA-256 of the key and every other member (:func:`sample_digest`), so a
  changed byte anywhere in the sample (``meta.json`` too) is detected.
The npz members are ordinary npz files (``np.load`` reads them) with fixed zip timestamps, so
identical arrays give identical bytes; ``cache.compression`` says how each entry is written:
``deflate`` (every entry deflated, what ``np.savez_compressed`` writes: the smallest shards,
the bytes of every cache built before the key existed), ``stored`` (none: ``np.savez``, the
fastest to read) or ``auto`` (an entry is deflated only when that at least halves it: smooth
confidences, masks and most images are, float16 point maps and float32 depth, whose low
mantissa bytes are noise to deflate, are stored). The reader takes any mix of stored and
deflated entries, so caches of every setting read alike. Decoding checks every size a member
claims against the sample's own shapes before allocating (``npz.py``) and never unpickles; every failure is a :class:`~distill3r.cache.errors.CacheError` naming the shard,
the sample and the member.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
import zipfile
import zlib
from typing import Any, Optional

import numpy as np

from distill3r.cache.errors import CacheError
from distill3r.cache.npz import ArraySpec, read_npz
from distill3r.cache.rle import rle_decode, rle_encode
from distill3r.teachers.base import TeacherOutput

FORMAT = "distill3r-cache/2"  # index.json "format" (2: per-sample sha256 member)
MEMBERS = ("gt.npz", "images.npz", "meta.json", "sha256", "teacher.npz")
REQUIRED_MEMBERS = ("images.npz", "meta.json", "sha256", "teacher.npz")
DIGEST_MEMBER = "sha256"
MAX_SAMPLE_PIXELS = 100_000_000  # default ceiling of views x H x W in one sample
MAX_META_BYTES = 1 << 20
INDEX_NAME = "index.json"
FLOAT16_MAX = float(np.finfo(np.float16).max)
TEACHER_ARRAYS = ("xyz_global", "xyz_local", "conf_global", "conf_local", "mask_rle", "mask_shape")
GT_ARRAYS = ("depth", "K", "c2w")
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
AUTO_MIN_RATIO = 2.0  # cache.compression auto: deflate an entry only if it shrinks this much


def _zip_method(array: np.ndarray, compression: str) -> int:
    """The zip method of one entry under ``cache.compression`` (see the module docstring)."""
    if compression == "deflate":
        return zipfile.ZIP_DEFLATED
    if compression == "stored":
        return zipfile.ZIP_STORED
    if compression != "auto":
        raise ValueError(f"cache.compression must be deflate, stored or auto, got "
                         f"{compression!r}")
    npy = io.BytesIO()
    np.lib.format.write_array(npy, array, allow_pickle=False)
    # the deflate stream zipfile writes: default level, raw (no zlib header)
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    size = len(deflate.compress(npy.getbuffer())) + len(deflate.flush())
    return zipfile.ZIP_DEFLATED if size * AUTO_MIN_RATIO <= npy.tell() else zipfile.ZIP_STORED


def npz_bytes(arrays: dict[str, np.ndarray], compression: str = "deflate") -> bytes:
    """An npz of ``arrays`` (no pickles, reproducible bytes), each entry deflated or stored
    as ``compression`` says: ``deflate`` (every entry), ``stored`` (none), ``auto`` (an entry
    is deflated when that at least halves it: ``AUTO_MIN_RATIO``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = _zip_method(array, compression)
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
    return buf.getvalue()


def sample_nbytes_bound(n: int, h: int, w: int, has_gt: bool = True) -> int:
    """An upper bound of one encoded sample's size in a tar (uncompressed payload + headers)."""
    px = n * h * w
    payload = px * (3 * 2 * 2 + 2 * 2 + 3 + 4) + 8 * (px + 1) + n * (9 + 16) * 4
    return payload + 16 * 1024  # npz/zip headers, meta.json, tar headers and padding


def encode_sample(key: str, teacher_out: TeacherOutput, images: np.ndarray,
                  gt: dict[str, np.ndarray] | None, meta: dict[str, Any],
                  conf_max: float = 60000.0, compression: str = "deflate") -> dict[str, Any]:
    """Validate and encode one sample to ``{"__key__": key, "<member>": bytes, ...}``.

    Args:
        key: ``[A-Za-z0-9_-]+`` (WebDataset splits member names at the first dot).
        teacher_out: float32 maps at the cache resolution (``TeacherOutput``).
        images: uint8 ``[N,H,W,3]``.
        gt: ``{"depth": [N,H,W], "K": [N,3,3], "c2w": [N,4,4]}`` or None.
        meta: JSON-serialisable dict.
        conf_max: confidences are clamped to ``[1, conf_max]``; at most float16's max.
        compression: ``cache.compression``, how the npz entries are written (:func:`npz_bytes`).
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
    sample = {"__key__": key, "teacher.npz": npz_bytes(arrays, compression),
              "images.npz": npz_bytes({"images": images}, compression)}
    if gt is not None:
        shapes = {"depth": (n, h, w), "K": (n, 3, 3), "c2w": (n, 4, 4)}
        gt32 = {}
        for name, shape in shapes.items():
            a = np.asarray(gt.get(name), dtype=np.float32) if gt.get(name) is not None else None
            if a is None or a.shape != shape or not np.all(np.isfinite(a)):
                raise ValueError(f"{where}: gt {name} must be finite with shape {list(shape)}")
            gt32[name] = a
        sample["gt.npz"] = npz_bytes(gt32, compression)
    sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    sample[DIGEST_MEMBER] = sample_digest(sample).encode()
    return sample


def sample_digest(raw: dict) -> str:
    """Hex SHA-256 over the key and every member except ``sha256`` (sorted by name, each as
    ``name NUL length NUL bytes``)."""
    digest = hashlib.sha256(f"{raw.get('__key__')}\0".encode())
    for name in sorted(k for k in raw if not k.startswith("__") and k != DIGEST_MEMBER):
        data = raw[name]
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def member_bytes_bound(n: int, h: int, w: int) -> int:
    """An upper bound of any one member's size (bytes in the tar) for ``n`` views of ``h x w``
    (a deflate stream of incompressible data is at most ~0.1 % larger than the data)."""
    return sample_nbytes_bound(n, h, w) * 101 // 100 + MAX_META_BYTES


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
def _arrays(raw: dict, member: str, specs: dict[str, ArraySpec], url, key) -> dict:
    try:
        return read_npz(raw[member], specs)
    except CacheError as exc:
        raise exc.located(url, key, member) from exc


def _float32(a: np.ndarray, name: str, member: str, url, key):
    """A new float32 tensor of the (read-only, float16 or float32) array ``a``, checked finite."""
    import torch

    with warnings.catch_warnings():  # ``a`` is only read: the result is a copy
        warnings.simplefilter("ignore", UserWarning)
        shared = torch.from_numpy(a)
    t = shared.float() if shared.dtype != torch.float32 else shared.clone()
    if not np.isfinite(t.numpy()).all():  # numpy's test is ~8x faster than torch's here
        raise CacheError(f"array {name} has non-finite values", url, key, member)
    return t


def _uint8(a: np.ndarray):
    """A torch view of the read-only uint8 array ``a`` (never written: only converted)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def decode_sample(raw: dict, shape: Optional[tuple[int, int, int]] = None,
                  max_pixels: int = MAX_SAMPLE_PIXELS) -> dict[str, Any]:
    """A raw sample (member name -> bytes, ``__key__``, ``__url__``) -> tensors.

    Args:
        shape: the ``(N, H, W)`` every sample of the split has (from ``index.json``); None
            takes it from ``images.npz``'s header, bounded by ``max_pixels`` (N x H x W).
    Returns ``key``, ``images`` float32 ``[N,3,H,W]`` in [0,1], ``xyz_global``/``xyz_local``
    float32 ``[N,H,W,3]``, ``conf_global``/``conf_local`` float32 ``[N,H,W]``, ``mask`` bool
    ``[N,H,W]``, ``meta`` dict and, with ground truth, ``depth``, ``K``, ``c2w`` (float32).
    Raises :class:`CacheError` naming the shard (``__url__``), the key and the member.
    """
    import torch

    from distill3r.inputs import images_to_input

    url, key = str(raw.get("__url__", "<unknown shard>")), str(raw.get("__key__", "<no key>"))
    for member in REQUIRED_MEMBERS:
        if member not in raw:
            raise CacheError("missing (incomplete or foreign sample)", url, key, member)
    for member in raw:
        if not member.startswith("__") and not isinstance(raw[member],
                                                          (bytes, bytearray, memoryview)):
            raise CacheError(f"is {type(raw[member]).__name__}, expected raw bytes", url, key,
                             member)
    if bytes(raw[DIGEST_MEMBER]) != sample_digest(raw).encode():
        raise CacheError("checksum mismatch: the sample's bytes changed after it was written",
                         url, key, DIGEST_MEMBER)
    px_max = max_pixels if shape is None else int(shape[0]) * int(shape[1]) * int(shape[2])
    want = (None, None, None) if shape is None else tuple(shape)
    images = _arrays(raw, "images.npz", {"images": ArraySpec(np.uint8, (*want, 3), 3 * px_max)},
                     url, key)["images"]
    n, h, w = images.shape[:3]
    if min(n, h, w) < 1 or n * h * w > px_max:
        raise CacheError(f"images {list(images.shape)} outside 1 <= N x H x W <= {px_max}",
                         url, key, "images.npz")
    px = n * h * w
    f16 = {name: ArraySpec(np.float16, (n, h, w, 3), 3 * px) for name in ("xyz_global",
                                                                          "xyz_local")}
    f16.update({name: ArraySpec(np.float16, (n, h, w), px) for name in ("conf_global",
                                                                         "conf_local")})
    t = _arrays(raw, "teacher.npz", {**f16, "mask_rle": ArraySpec(np.int32, (None,), px + 1),
                                     "mask_shape": ArraySpec(np.int64, (3,), 3)}, url, key)
    maps = {name: _float32(t[name], name, "teacher.npz", url, key) for name in f16}
    for name in ("conf_global", "conf_local"):
        if maps[name].numel() and float(maps[name].min()) < 1:
            raise CacheError(f"array {name} has values below 1", url, key, "teacher.npz")
    if t["mask_shape"].tolist() != [n, h, w]:
        raise CacheError(f"mask_shape {t['mask_shape'].tolist()} != images {[n, h, w]}", url,
                         key, "teacher.npz")
    try:
        mask = rle_decode(t["mask_rle"], t["mask_shape"], max_size=px)
    except CacheError as exc:
        raise exc.located(url, key, "teacher.npz") from exc
    meta_bytes = bytes(raw["meta.json"])
    if len(meta_bytes) > MAX_META_BYTES:
        raise CacheError(f"{len(meta_bytes)} bytes, above {MAX_META_BYTES}", url, key,
                         "meta.json")
    try:
        meta = json.loads(meta_bytes.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CacheError(f"not valid JSON: {type(exc).__name__}", url, key, "meta.json") \
            from exc
    if not isinstance(meta, dict):
        raise CacheError("must hold a JSON object", url, key, "meta.json")
    result = {"key": raw.get("__key__"), "images": images_to_input(_uint8(images)), **maps,
              "mask": torch.from_numpy(mask)}
    if "gt.npz" in raw:
        specs = {"depth": ArraySpec(np.float32, (n, h, w), px),
                 "K": ArraySpec(np.float32, (n, 3, 3), 9 * n),
                 "c2w": ArraySpec(np.float32, (n, 4, 4), 16 * n)}
        g = _arrays(raw, "gt.npz", specs, url, key)
        for name in specs:
            result[name] = _float32(g[name], name, "gt.npz", url, key)
    result["meta"] = meta
    return result
