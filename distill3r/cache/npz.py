"""Bounded reading of the cache's npz members (zip of ``.npy`` files), never unpickling.

Every size a file claims is checked before memory is allocated for it: the zip entry's flags
(no encryption), method (stored or deflate only) and declared uncompressed size, then the npy
header (format version, at most 10,000 header bytes, dtype, C order, shape) against what the
caller expects, and the declared size against header + data. Data is read into one array of
the expected size; decompression stops there, and the entry's CRC is checked at its end.
Whatever fails underneath (zip, zlib, npy header parsing, short data) becomes a
:class:`~distill3r.cache.errors.CacheError` naming the array.
"""

from __future__ import annotations

import io
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from distill3r.cache.errors import CacheError

MAX_NPY_HEADER = 10_000  # numpy's own default limit for npy headers
# what zipfile, zlib and numpy's header parser raise for malformed input
_DECODE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError,
                  ValueError, TypeError, KeyError, IndexError, struct.error, OverflowError,
                  NotImplementedError, RuntimeError, SyntaxError, tokenize.TokenError,
                  RecursionError, UnicodeDecodeError)


@dataclass(frozen=True)
class ArraySpec:
    """What one array must be: ``dtype``, ``shape`` (``None`` entries are free dimensions) and
    at most ``max_elements`` elements in all."""

    dtype: np.dtype
    shape: tuple[Optional[int], ...]
    max_elements: int


def _check_header(name: str, spec: ArraySpec, shape: tuple, fortran: bool,
                  dtype: np.dtype) -> int:
    if dtype != np.dtype(spec.dtype):
        raise CacheError(f"array {name} must be {np.dtype(spec.dtype)}, header says {dtype}")
    if fortran:
        raise CacheError(f"array {name} is stored in Fortran order (the writer never does)")
    if len(shape) != len(spec.shape) or any(not isinstance(s, int) or s < 0 for s in shape):
        raise CacheError(f"array {name} must have shape {list(spec.shape)}, header says "
                         f"{list(shape)}")
    if any(want is not None and got != want for got, want in zip(shape, spec.shape)):
        raise CacheError(f"array {name} must have shape {list(spec.shape)}, header says "
                         f"{list(shape)}")
    count = 1
    for s in shape:
        count *= s
    if count > spec.max_elements:
        raise CacheError(f"array {name} header claims {list(shape)} ({count} elements), above "
                         f"the limit of {spec.max_elements}")
    return count


def _read_entry(zf: zipfile.ZipFile, name: str, spec: ArraySpec) -> np.ndarray:
    try:
        info = zf.getinfo(f"{name}.npy")
    except KeyError:
        raise CacheError(f"has no array {name!r}") from None
    if info.flag_bits & 0x1:
        raise CacheError(f"array {name} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CacheError(f"array {name} uses zip method {info.compress_type} (only stored and "
                         "deflate are read)")
    itemsize = np.dtype(spec.dtype).itemsize
    if info.file_size > spec.max_elements * itemsize + MAX_NPY_HEADER + 16:
        raise CacheError(f"array {name} claims {info.file_size} bytes, above the limit for "
                         f"{spec.max_elements} elements")
    with zf.open(info) as f:
        major, minor = np.lib.format.read_magic(f)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(
                f, max_header_size=MAX_NPY_HEADER)
        elif major == 2 and minor == 0:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(
                f, max_header_size=MAX_NPY_HEADER)
        else:
            raise CacheError(f"array {name} has npy format version {major}.{minor}")
        count = _check_header(name, spec, shape, fortran, dtype)
        header_end = f.tell()
        if header_end + count * itemsize != info.file_size:
            raise CacheError(f"array {name} of {list(shape)} needs {header_end + count * itemsize}"
                             f" bytes, the zip entry declares {info.file_size}")
        out = np.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise CacheError(f"array {name} ends after {got} of {len(view)} data bytes")
            got += n
        if f.read(1):  # also reaches the entry's end, where zipfile checks the CRC
            raise CacheError(f"array {name} has data after its {len(view)} bytes")
    return out


def read_npz(data: bytes, specs: dict[str, ArraySpec]) -> dict[str, np.ndarray]:
    """The arrays named in ``specs`` from npz bytes (other entries are ignored, never read).

    Raises :class:`CacheError` (without a location: the caller adds shard, sample, member)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CacheError(f"is {type(data).__name__}, expected raw bytes")
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
            return {name: _read_entry(zf, name, spec) for name, spec in specs.items()}
    except CacheError:
        raise
    except _DECODE_ERRORS as exc:
        raise CacheError(f"not a readable npz ({type(exc).__name__}: {exc})") from exc
