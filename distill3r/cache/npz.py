"""Bounded reading of the cache's npz members (zip of ``.npy`` files), never unpickling.

The zip's central directory is parsed by ``zipfile``; each wanted entry's data is then taken
straight from the member bytes (APPNOTE 4.3.7: a 30-byte local header, the name, the extra
field, then the data), so a stored entry costs no copy and a deflated one is inflated once,
in one call. Every size a file claims is checked before memory is allocated for it: the
entry's flags (no encryption, no patch data), method (stored or deflate only), declared
sizes (against the caller's limit and the member's length), the local header (signature,
the same name as the directory), then the npy header (format version, at most 10,000 header
bytes, dtype, C order, shape) against what the caller expects, and the declared size against
header + data. Inflating stops at the declared size; a stream that holds more or less, and a
CRC-32 that differs from the directory's, are errors. Whatever fails underneath (zip, zlib,
npy header parsing, short data) becomes a :class:`~distill3r.cache.errors.CacheError` naming
the array. Arrays come back read-only when they share the member's bytes.
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
# APPNOTE 4.3.7 local file header: signature, version, flags, method, time, date, CRC-32,
# compressed size, uncompressed size, name length, extra field length
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_NPY_MIN_BYTES = 10  # magic string, version, header length
_UNSUPPORTED_FLAGS = 0x1 | 0x20 | 0x40  # encrypted, compressed patch data, strong encryption
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


def _entry_data(data: memoryview, info: zipfile.ZipInfo, name: str,
                max_bytes: int) -> memoryview | bytes:
    """The uncompressed bytes of one zip entry (checked as the module docstring says)."""
    if info.flag_bits & _UNSUPPORTED_FLAGS:
        raise CacheError(f"array {name} is encrypted or patch data (zip flags "
                         f"{info.flag_bits:#06x})")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CacheError(f"array {name} uses zip method {info.compress_type} (only stored and "
                         "deflate are read)")
    if info.file_size > max_bytes:
        raise CacheError(f"array {name} claims {info.file_size} bytes, above the limit of "
                         f"{max_bytes}")
    if info.file_size < _NPY_MIN_BYTES:  # (also: zlib reads a max_length of 0 as unlimited)
        raise CacheError(f"array {name} claims {info.file_size} bytes, too few for an npy "
                         "header")
    at = info.header_offset
    head = bytes(data[at:at + _LOCAL_HEADER.size])
    if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
        raise CacheError(f"array {name}: no local zip header at byte {at}")
    name_len, extra_len = _LOCAL_HEADER.unpack(head)[9:11]
    start = at + _LOCAL_HEADER.size
    if bytes(data[start:start + name_len]) != info.orig_filename.encode("ascii", "replace"):
        raise CacheError(f"array {name}: the local zip header names another file")
    start += name_len + extra_len
    if start + info.compress_size > len(data):
        raise CacheError(f"array {name} claims {info.compress_size} stored bytes, the npz ends "
                         f"{max(0, len(data) - start)} bytes after its header")
    payload = data[start:start + info.compress_size]
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise CacheError(f"array {name} is stored with {info.compress_size} bytes but "
                             f"declares {info.file_size}")
        out: memoryview | bytes = payload
    else:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        out = inflate.decompress(payload, info.file_size)
        if len(out) == info.file_size and not inflate.eof:
            extra = inflate.decompress(inflate.unconsumed_tail, 1)
            if extra:
                raise CacheError(f"array {name} inflates to more than the {info.file_size} "
                                 "bytes its zip entry declares")
        if len(out) != info.file_size or not inflate.eof or inflate.unused_data:
            raise CacheError(f"array {name}: the deflate stream gives {len(out)} bytes "
                             f"{'' if inflate.eof else '(unterminated) '}where the zip entry "
                             f"declares {info.file_size}")
    if zlib.crc32(out) != info.CRC:
        raise CacheError(f"array {name}: CRC-32 mismatch (corrupt zip entry)")
    return out


def _read_entry(data: memoryview, zf: zipfile.ZipFile, name: str,
                spec: ArraySpec) -> np.ndarray:
    try:
        info = zf.getinfo(f"{name}.npy")
    except KeyError:
        raise CacheError(f"has no array {name!r}") from None
    itemsize = np.dtype(spec.dtype).itemsize
    raw = _entry_data(data, info, name, spec.max_elements * itemsize + MAX_NPY_HEADER + 16)
    f = io.BytesIO(bytes(raw[:MAX_NPY_HEADER + 16]))
    major, minor = np.lib.format.read_magic(f)
    if (major, minor) == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(
            f, max_header_size=MAX_NPY_HEADER)
    elif (major, minor) == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(
            f, max_header_size=MAX_NPY_HEADER)
    else:
        raise CacheError(f"array {name} has npy format version {major}.{minor}")
    count = _check_header(name, spec, shape, fortran, dtype)
    header_end = f.tell()
    if header_end + count * itemsize != len(raw):
        raise CacheError(f"array {name} of {list(shape)} needs {header_end + count * itemsize} "
                         f"bytes, the zip entry declares {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header_end).reshape(shape)


def read_npz(data: bytes, specs: dict[str, ArraySpec]) -> dict[str, np.ndarray]:
    """The arrays named in ``specs`` from npz bytes (other entries are ignored, never read).

    Arrays are read-only (they may share ``data``'s bytes). Raises :class:`CacheError`
    (without a location: the caller adds shard, sample, member)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CacheError(f"is {type(data).__name__}, expected raw bytes")
    data = bytes(data)  # no copy for bytes; a fixed snapshot of anything mutable
    view = memoryview(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return {name: _read_entry(view, zf, name, spec) for name, spec in specs.items()}
    except CacheError:
        raise
    except _DECODE_ERRORS as exc:
        raise CacheError(f"not a readable npz ({type(exc).__name__}: {exc})") from exc
