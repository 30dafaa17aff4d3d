"""Disk-backed per-view maps for inference at many views, and an exact streamed percentile.

A :class:`MapStore` is a folder of ``.npy`` files, one per map (``<name>.npy``, shape
``[N, H, W, ...]``), filled view chunk by view chunk in view order with plain file writes and
read back one view (or a run of views) at a time into ordinary memory. Nothing is memory-mapped:
mapped file pages count in a process's resident set, so a memmap of all views would grow the
peak memory with ``N`` again. The files are standard ``.npy`` (``np.load(path,
mmap_mode="r")`` opens them).

Float maps are stored as float16; values beyond float16's range become ``inf`` (treated as not
finite downstream, like any non-finite prediction).

:class:`Float16Histogram` counts the float16 values of a map (all 65536 bit patterns), which
makes a percentile over all views exact for the stored values without holding them:
:meth:`Float16Histogram.percentile` equals ``np.percentile`` (linear method) of the same values.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)


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
        with np.errstate(over="ignore"):
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


# every float16 value by bit pattern, and the order of the non-NaN ones
_ALL_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
_ORDER = np.argsort(_ALL_F16.astype(np.float64), kind="stable")
_ORDER = _ORDER[~np.isnan(_ALL_F16[_ORDER])]


class Float16Histogram:
    """Counts of float16 values (by bit pattern), added view by view; NaNs are never counted."""

    def __init__(self) -> None:
        self.counts = np.zeros(65536, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` (any shape; converted to float16 as the store does)."""
        with np.errstate(over="ignore"):
            bits = np.ascontiguousarray(values, dtype=np.float16).reshape(-1).view(np.uint16)
        self.counts += np.bincount(bits, minlength=65536)

    @property
    def total(self) -> int:
        return int(self.counts[_ORDER].sum())

    def count_at_least(self, threshold: float) -> int:
        """How many counted values are ``>= threshold``."""
        values = _ALL_F16.astype(np.float64)
        return int(self.counts[~np.isnan(values) & (values >= threshold)].sum())

    def percentile(self, q: float) -> float:
        """``np.percentile(values, q)`` (method ``linear``) of every value added, as float64;
        ``ValueError`` if nothing was counted."""
        counts = self.counts[_ORDER]
        n = int(counts.sum())
        if n == 0:
            raise ValueError("percentile of an empty histogram")
        cum = np.cumsum(counts)
        virtual = (n - 1) * (np.float64(q) / 100.0)
        lo = min(max(int(np.floor(virtual)), 0), n - 1)
        hi = min(lo + 1, n - 1)

        def ranked(k: int) -> float:  # the k-th smallest value (0-based)
            return float(_ALL_F16[_ORDER[np.searchsorted(cum, k, side="right")]])

        a, b = ranked(lo), ranked(hi)
        t = virtual - lo
        # numpy's _lerp: a + (b - a) t, computed from b's side for t >= 0.5
        return float(b - (b - a) * (1 - t)) if t >= 0.5 else float(a + (b - a) * t)
