"""Run-length encoding of boolean masks (no pickles: plain int32 arrays).

Format: the mask is flattened in C order; ``runs`` is a 1-D ``int32`` array of run lengths that
alternate False, True, False, ... and always starts with a False run (of length 0 when the first
element is True). ``runs.sum() == mask.size``. The shape is stored separately (``mask_shape``,
int64) so masks of any rank round-trip exactly.
"""

from __future__ import annotations

import numpy as np

from distill3r.cache.errors import CacheError

_INT32_MAX = np.iinfo(np.int32).max


def rle_encode(mask: np.ndarray) -> np.ndarray:
    """Encode a boolean mask of any shape to int32 run lengths (see module docstring)."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"rle_encode: mask must be bool, got {mask.dtype}")
    flat = mask.reshape(-1)
    if flat.size == 0:
        return np.zeros(0, dtype=np.int32)
    if flat.size > _INT32_MAX:
        raise ValueError(f"rle_encode: mask of {flat.size} elements is too large for int32 runs")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs.astype(np.int32)


def rle_decode(runs: np.ndarray, shape, max_size: int = _INT32_MAX) -> np.ndarray:
    """Decode run lengths back to a bool mask of ``shape``.

    Every size is checked before anything is allocated: the shape's element count (in Python
    integers, so no overflow) must be at most ``max_size`` (and int32-countable), there can be
    at most ``size + 1`` runs, and each run lies in ``[0, size]``, so their int64 sum cannot
    wrap. Raises :class:`CacheError` for corrupt input (runs not 1-D integers, negative runs, a
    bad shape, a total length that does not match the shape).
    """
    runs = np.asarray(runs)
    shape_arr = np.asarray(shape)
    if runs.ndim != 1 or not np.issubdtype(runs.dtype, np.integer):
        raise CacheError(f"corrupt RLE: runs must be a 1-D integer array, got {runs.dtype} "
                         f"with shape {list(runs.shape)}")
    if shape_arr.ndim != 1 or shape_arr.size > 8 or not np.issubdtype(shape_arr.dtype,
                                                                      np.integer):
        raise CacheError(f"corrupt RLE: shape must be a short 1-D integer array, got "
                         f"{shape_arr.dtype} {list(shape_arr.shape)}")
    shape_t = tuple(int(s) for s in shape_arr)
    if any(s < 0 for s in shape_t):
        raise CacheError(f"corrupt RLE: negative dimension in shape {list(shape_t)}")
    size = 1
    for s in shape_t:
        size *= s
    if size > min(max_size, _INT32_MAX):
        raise CacheError(f"corrupt RLE: shape {list(shape_t)} has {size} elements, above the "
                         f"limit {min(max_size, _INT32_MAX)}")
    if runs.size > size + 1:
        raise CacheError(f"corrupt RLE: {runs.size} runs for {size} elements")
    if runs.size and int(runs.min()) < 0:
        raise CacheError("corrupt RLE: negative run length")
    if runs.size and int(runs.max()) > size:
        raise CacheError(f"corrupt RLE: a run of {int(runs.max())} is longer than the mask "
                         f"({size} elements)")
    runs64 = runs.astype(np.int64)
    total = int(runs64.sum())  # <= (size + 1) * size < 2^63: cannot wrap
    if total != size:
        raise CacheError(f"corrupt RLE: runs cover {total} elements but shape {list(shape_t)} "
                         f"has {size}")
    values = (np.arange(runs.size) % 2).astype(np.bool_)  # False, True, False, ...
    return np.repeat(values, runs64).reshape(shape_t)
