"""Run-length encoding of boolean masks (no pickles: plain int32 arrays).

Format: the mask is flattened in C order; ``runs`` is a 1-D ``int32`` array of run lengths that
alternate False, True, False, ... and always starts with a False run (of length 0 when the first
element is True). ``runs.sum() == mask.size``. The shape is stored separately (``mask_shape``,
int64) so masks of any rank round-trip exactly.
"""

from __future__ import annotations

import numpy as np

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


def rle_decode(runs: np.ndarray, shape) -> np.ndarray:
    """Decode run lengths back to a bool mask of ``shape``.

    Raises ``ValueError`` for corrupt input: runs not 1-D integers, negative runs, a negative or
    non-integer shape, or a total length that does not match the shape.
    """
    runs = np.asarray(runs)
    shape_arr = np.asarray(shape)
    if runs.ndim != 1 or not np.issubdtype(runs.dtype, np.integer):
        raise ValueError(f"corrupt RLE: runs must be a 1-D integer array, got {runs.dtype} "
                         f"with shape {runs.shape}")
    if shape_arr.ndim != 1 or not np.issubdtype(shape_arr.dtype, np.integer):
        raise ValueError(f"corrupt RLE: shape must be a 1-D integer array, got {shape_arr!r}")
    if np.any(shape_arr < 0):
        raise ValueError(f"corrupt RLE: negative dimension in shape {shape_arr.tolist()}")
    if np.any(runs < 0):
        raise ValueError("corrupt RLE: negative run length")
    shape_t = tuple(int(s) for s in shape_arr)
    size = int(np.prod(shape_t, dtype=np.int64))
    total = int(runs.astype(np.int64).sum())
    if total != size:
        raise ValueError(f"corrupt RLE: runs cover {total} elements but shape {list(shape_t)} "
                         f"has {size}")
    values = (np.arange(runs.size) % 2).astype(np.bool_)  # False, True, False, ...
    return np.repeat(values, runs.astype(np.int64)).reshape(shape_t)
