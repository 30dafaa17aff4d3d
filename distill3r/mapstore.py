"""Disk-backed per-view maps for inference at many views, and an exact streamed percentile.

A :class:`MapStore` is a folder of ``.npy`` files, one per map (``<name>.npy``, shape
``[N, H, W, ...]``), filled view chunk by view chunk in view order with plain file writes and
read back one view (or a run of views) at a time into ordinary memory. Nothing is memory-mapped:
mapped file pages count in a process's resident set, so a memmap of all views would grow the
peak memory with ``N`` again. The files are standard ``.npy`` (``np.load(path,
mmap_mode="r")`` opens them).

Point maps are stored as float16 (values beyond its range become ``inf``, treated as not
finite downstream like any non-finite prediction); confidences as float32, so that the
confidence percentile and the pixels at or above it are exactly those of the float32 maps.

:class:`StreamedPercentile` makes that percentile over all views exact without holding the
values: it equals ``np.percentile`` (linear method) of the same float32 values.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np



class StoredArray:
    """Read-only view of one ``.npy`` map of a :class:`MapStore`: ``shape``, ``dtype``,
    ``len()``, and ``a[i]`` / ``a[i:j]`` (a contiguous run of views, step 1) read from disk."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
        self.path, self.shape, self.dtype, self._offset = path, shape, np.dtype(dtype), offset
        self._view_items = int(np.prod(shape[1:], dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int | slice) -> np.ndarray:
        n = self.shape[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                raise IndexError(f"{self.path}: only contiguous view slices are supported")
            count = max(0, stop - start)
        else:
            start = int(index) + (n if int(index) < 0 else 0)
            if not 0 <= start < n:
                raise IndexError(f"{self.path}: view {index} out of range for {n} views")
            count = 1
        data = np.fromfile(self.path, dtype=self.dtype, count=count * self._view_items,
                           offset=self._offset + start * self._view_items * self.dtype.itemsize)
        data = data.reshape((count,) + tuple(self.shape[1:]))
        return data if isinstance(index, slice) else data[0]


class MapStore:
    """A folder of per-map ``.npy`` files written in view order (see the module docstring).

    ``create(name, shape, dtype)`` writes the header; ``append(name, chunk)`` adds the next
    views; ``close()`` checks every map got all ``N`` views; ``store[name]`` is a
    :class:`StoredArray`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple] = {}  # name -> (handle, shape, dtype, offset, written)

    def create(self, name: str, shape: tuple[int, ...], dtype) -> None:
        path = self.folder / f"{name}.npy"
        dtype = np.dtype(dtype)
        fh = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": tuple(int(s) for s in shape)}
        np.lib.format.write_array_header_1_0(fh, header)
        self._files[name] = [fh, tuple(int(s) for s in shape), dtype, fh.tell(), 0]

    def append(self, name: str, chunk: np.ndarray) -> None:
        """Write the next ``len(chunk)`` views of ``name`` (cast to the map's dtype; float16
        maps saturate to ``inf`` beyond float16's range)."""
        entry = self._files[name]
        fh, shape, dtype, _, written = entry
        chunk = np.asarray(chunk)
        if tuple(chunk.shape[1:]) != shape[1:]:
            raise ValueError(f"{self.folder / name}.npy: chunk {chunk.shape} does not match "
                             f"views of shape {shape[1:]}")
        if written + len(chunk) > shape[0]:
            raise ValueError(f"{self.folder / name}.npy: more than {shape[0]} views written")
        with np.errstate(over="ignore", invalid="ignore"):
            fh.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
        entry[4] = written + len(chunk)

    def close(self) -> None:
        """Flush and close every map; ``ValueError`` if one is short of views."""
        short = []
        for name, (fh, shape, _, _, written) in self._files.items():
            if not fh.closed:
                fh.close()
            if written != shape[0]:
                short.append(f"{name} ({written} of {shape[0]} views)")
        if short:
            raise ValueError(f"{self.folder}: incomplete maps: {', '.join(short)}")

    def __getitem__(self, name: str) -> StoredArray:
        fh, shape, dtype, offset, _ = self._files[name]
        if not fh.closed:
            fh.flush()
        return StoredArray(self.folder / f"{name}.npy", shape, dtype, offset)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def remove(self) -> None:
        """Close and delete the map files (the folder too when it is left empty)."""
        for name, (fh, *_rest) in self._files.items():
            if not fh.closed:
                fh.close()
            (self.folder / f"{name}.npy").unlink(missing_ok=True)
        self._files.clear()
        try:
            os.rmdir(self.folder)
        except OSError:
            pass


def _keys(values: np.ndarray) -> np.ndarray:
    """float32 values -> uint32 keys in the same order (sign-flipped bit patterns)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))


def _value(key: int) -> np.float32:
    bits = np.uint32(key & 0x7FFFFFFF) if key >> 31 else np.uint32(~np.uint32(key))
    return np.array([bits], np.uint32).view(np.float32)[0]


class StreamedPercentile:
    """``np.percentile(values, q)`` (method ``linear``, float32 values) of values met in pieces,
    exactly, in two passes of 65536-bin histograms (a radix select on the float32 bit patterns):

    1. ``add(values)`` for every piece: counts of the high 16 bits of the order-preserving keys;
    2. ``plan(q)`` names the high bins holding the two order statistics the percentile
       interpolates; ``refine(values)`` for every piece again counts the low 16 bits of the
       values in those bins; ``result()`` is the percentile (as a float).

    Memory is four histograms whatever the number of values; NaNs must not be added."""

    def __init__(self) -> None:
        self.high = np.zeros(65536, dtype=np.int64)
        self._low: dict[int, np.ndarray] = {}

    def add(self, values: np.ndarray) -> None:
        self.high += np.bincount(_keys(values) >> 16, minlength=65536)

    @property
    def total(self) -> int:
        return int(self.high.sum())

    def plan(self, q: float) -> None:
        n = self.total
        if n == 0:
            raise ValueError("percentile of no values")
        virtual = (n - 1) * (np.float64(q) / 100.0)  # numpy's linear method
        lo = min(max(int(np.floor(virtual)), 0), n - 1)
        self._ranks = (lo, min(lo + 1, n - 1))
        self._gamma = float(virtual - lo)
        cum = np.cumsum(self.high)
        self._bins = [int(np.searchsorted(cum, k, side="right")) for k in self._ranks]
        self._before = [int(cum[b] - self.high[b]) for b in self._bins]
        self._low = {b: np.zeros(65536, dtype=np.int64) for b in self._bins}

    def refine(self, values: np.ndarray) -> None:
        keys = _keys(values)
        high = keys >> 16
        for b, counts in self._low.items():
            counts += np.bincount(keys[high == b] & 0xFFFF, minlength=65536)

    def result(self) -> float:
        ranked = []
        for rank, b, before in zip(self._ranks, self._bins, self._before):
            low = int(np.searchsorted(np.cumsum(self._low[b]), rank - before, side="right"))
            ranked.append(_value((b << 16) | low))
        a, b = ranked
        t = self._gamma  # numpy's _lerp in the values' dtype (float32), from b for t >= 0.5
        diff = b - a
        return float(b - diff * (1 - t)) if t >= 0.5 else float(a + diff * t)
