"""Read the teacher cache: the one reader used by training and evaluation.

A split folder holds ``index.json`` and plain tar shards. :func:`read_index` validates the
index as a schema (types, counts >= 0, shard names plain file names inside the folder, sizes
under the ceilings) and :func:`split_shards` checks every listed shard exists with the size the
index records. :func:`shard_samples` reads one shard's raw samples (strict tar reader, known
member names, no duplicates, every required member) and fails when the shard holds fewer or
more samples than ``index.json`` lists, so a cut or edited shard is never read short silently.
:func:`decode_sample` (``schema.py``) checks a sample's checksum and every size before
allocating. :func:`read_range` serves training (a window over the concatenated shards),
:func:`read_split` evaluation (every sample in index order). All errors are
:class:`CacheError`, naming the file, the sample and the member.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from distill3r.cache.errors import CacheError
from distill3r.cache.schema import (FORMAT, INDEX_NAME, KEY_RE, MAX_SAMPLE_PIXELS, MEMBERS,
                                    REQUIRED_MEMBERS, decode_sample, member_bytes_bound)
from distill3r.cache.tar import BLOCK, tar_members

__all__ = ["CacheError", "Shard", "read_index", "split_shards", "shard_samples", "read_range",
           "read_split", "decode_sample", "check_compatible", "check_same_build",
           "collate_samples"]

SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.tar$")
MAX_INDEX_BYTES = 64 << 20
# a sample has at least its required members, each a header block plus one data block
MIN_SAMPLE_BYTES = len(REQUIRED_MEMBERS) * 2 * BLOCK


@dataclass(frozen=True)
class Shard:
    """One shard of a split: its path, sample count and per-sample ``(N, H, W)``."""

    path: Path
    num_samples: int
    shape: Optional[tuple[int, int, int]] = None


def _int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_shards(shards: Any, where: str) -> int:
    if not isinstance(shards, list):
        raise CacheError(f"'shards' must be a list, got {type(shards).__name__}", where)
    names: set[str] = set()
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise CacheError(f"shards[{i}] must be an object, got {type(s).__name__}", where)
        name = s.get("name")
        if not isinstance(name, str) or not SHARD_NAME_RE.match(name):
            raise CacheError(f"shards[{i}].name {name!r} is not a plain shard file name (no "
                             "folders, no '..')", where)
        if name in names:
            raise CacheError(f"shard {name} is listed twice", where)
        names.add(name)
        if not _int(s.get("samples")) or not _int(s.get("bytes")):
            raise CacheError(f"shards[{i}] ({name}): 'samples' and 'bytes' must be integers "
                             f">= 0, got {s.get('samples')!r}, {s.get('bytes')!r}", where)
        if s["samples"] * MIN_SAMPLE_BYTES > s["bytes"]:
            raise CacheError(f"shards[{i}] ({name}): {s['samples']} samples cannot fit in "
                             f"{s['bytes']} bytes", where)
    return sum(s["samples"] for s in shards)


def read_index(split_dir: str | Path, max_pixels: int = MAX_SAMPLE_PIXELS) -> dict:
    """``<split_dir>/index.json``, validated; :class:`CacheError` naming the file otherwise.

    ``max_pixels`` bounds ``views_per_sample x H x W``."""
    path = Path(split_dir) / INDEX_NAME
    where = str(path)
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise CacheError(f"larger than {MAX_INDEX_BYTES} bytes", where)
        index = json.loads(path.read_bytes().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CacheError(f"cache index missing or unreadable ({type(exc).__name__}): run the "
                         "cache stage", where) from exc
    if not isinstance(index, dict):
        raise CacheError(f"must hold a JSON object, got {type(index).__name__}", where)
    if index.get("format") != FORMAT:
        raise CacheError(f"not a {FORMAT} index (format {index.get('format')!r}): rebuild the "
                         "cache (dvc repro cache)", where)
    for key in ("split", "fingerprint"):
        if not isinstance(index.get(key), str):
            raise CacheError(f"{key!r} must be a string, got {index.get(key)!r}", where)
    if not isinstance(index.get("teacher"), dict):
        raise CacheError("'teacher' must be an object", where)
    total = _check_shards(index.get("shards"), where)
    if index.get("num_samples") != total:
        raise CacheError(f"num_samples {index.get('num_samples')!r} != the shards' sum {total}",
                         where)
    size, views = index.get("image_size"), index.get("views_per_sample")
    if not isinstance(size, list) or len(size) != 2 or not all(_int(s, 1) for s in size) \
            or not _int(views, 1):
        raise CacheError(f"image_size {size!r} must be [H, W] and views_per_sample {views!r} an "
                         "integer >= 1", where)
    if views * size[0] * size[1] > max_pixels:
        raise CacheError(f"{views} views of {size[0]}x{size[1]} exceed the ceiling of "
                         f"{max_pixels} pixels per sample", where)
    return index


def split_shards(split_dir: str | Path, max_pixels: int = MAX_SAMPLE_PIXELS
                 ) -> tuple[dict, list[Shard]]:
    """``(index, shards)`` of a split folder: the shards with at least one sample, in index
    order; each listed shard must exist with the size ``index.json`` records. ``CacheError``
    naming the folder when it is missing, unindexed, inconsistent or holds no sample."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise CacheError("cache split folder not found (run the cache stage first)",
                         str(split_dir))
    index = read_index(split_dir, max_pixels)
    shape = (index["views_per_sample"], *index["image_size"])
    shards = []
    for s in index["shards"]:
        path = split_dir.resolve() / s["name"]
        if not path.is_file():
            raise CacheError(f"shard listed in {INDEX_NAME} is missing", str(path))
        if path.stat().st_size != s["bytes"]:
            raise CacheError(f"{path.stat().st_size} bytes, {INDEX_NAME} lists {s['bytes']} "
                             "(truncated or replaced shard)", str(path))
        if s["samples"]:
            shards.append(Shard(path, s["samples"], shape))
    if not shards:
        raise CacheError("the cache split holds no samples", str(split_dir))
    return index, shards


def _finished(sample: dict) -> dict:
    for member in REQUIRED_MEMBERS:
        if member not in sample:
            raise CacheError("missing (incomplete or foreign sample)", sample["__url__"],
                             sample["__key__"], member)
    return sample


def shard_samples(path: str | Path, expected: Optional[int] = None,
                  shape: Optional[tuple[int, int, int]] = None) -> Iterator[dict]:
    """Raw samples of one shard in stored order (member name -> bytes, ``__key__``,
    ``__url__``).

    Args:
        expected: the sample count ``index.json`` lists; more or fewer is a ``CacheError``
            (raised when the shard has been read to its end).
        shape: ``(N, H, W)`` of the split's samples: members above the size such a sample can
            have are refused before they are read (default: the ``MAX_SAMPLE_PIXELS`` ceiling).
    """
    url = str(path)
    limit = member_bytes_bound(*shape) if shape else member_bytes_bound(1, 1, MAX_SAMPLE_PIXELS)
    seen: set[str] = set()
    sample: Optional[dict] = None
    for name, data in tar_members(url, limit):
        key, dot, member = name.partition(".")
        if not dot or not KEY_RE.match(key) or member not in MEMBERS:
            raise CacheError(f"unexpected member name (members are <key>.{{{','.join(MEMBERS)}}})",
                             url, member=name)
        if sample is not None and sample["__key__"] != key:
            yield _finished(sample)
            sample = None
        if sample is None:
            if key in seen:
                raise CacheError("appears twice in the shard (duplicated or split sample)", url,
                                 key)
            if expected is not None and len(seen) >= expected:
                raise CacheError(f"the shard holds more than the {expected} samples "
                                 f"{INDEX_NAME} lists", url, key)
            seen.add(key)
            sample = {"__key__": key, "__url__": url}
        if member in sample:
            raise CacheError("appears twice in the sample", url, key, member)
        sample[member] = data
    if sample is not None:
        yield _finished(sample)
    if expected is not None and len(seen) != expected:
        raise CacheError(f"holds {len(seen)} samples but {INDEX_NAME} lists {expected} (cut or "
                         "rewritten shard: rebuild or pull the cache again)", url)


def read_range(shards: list[Shard], start: int, length: int) -> Iterator[dict]:
    """Raw samples at positions ``start .. start + length - 1`` (modulo the total) of the
    concatenation of ``shards``; each shard is checked against its listed sample count."""
    total = sum(s.num_samples for s in shards)
    ends = np.cumsum([s.num_samples for s in shards])
    pos, remaining = start % total, length
    while remaining > 0:
        i = int(np.searchsorted(ends, pos, side="right"))
        skip = pos - (int(ends[i]) - shards[i].num_samples)
        take = min(remaining, shards[i].num_samples - skip)
        got = 0
        for j, raw in enumerate(shard_samples(shards[i].path, shards[i].num_samples,
                                              shards[i].shape)):
            if j >= skip:
                yield raw
                got += 1
                if got == take:
                    break
        remaining -= take
        pos = (pos + take) % total


def read_split(split_dir: str | Path, max_samples: Optional[int] = None, decode: bool = True,
               max_pixels: int = MAX_SAMPLE_PIXELS) -> Iterator[dict]:
    """Every sample of a split in index order (shards in ``index.json`` order, samples in
    shard order), decoded (:func:`decode_sample`) or raw; at most ``max_samples``."""
    _, shards = split_shards(split_dir, max_pixels)
    count = 0
    for shard in shards:
        for raw in shard_samples(shard.path, shard.num_samples, shard.shape):
            if max_samples is not None and count >= max_samples:
                return
            yield decode_sample(raw, shard.shape) if decode else raw
            count += 1


def check_compatible(index: dict, teacher_fingerprint: str | None = None,
                     image_size: list[int] | tuple[int, int] | None = None,
                     views_per_sample: int | None = None, where: str = "cache") -> None:
    """``ValueError`` if the cache was built by another teacher or at another resolution."""
    problems = []
    got_fp = index.get("teacher", {}).get("fingerprint")
    if teacher_fingerprint is not None and got_fp != teacher_fingerprint:
        problems.append(f"teacher fingerprint {got_fp!r} != expected {teacher_fingerprint!r}")
    if image_size is not None and list(index.get("image_size", [])) != list(image_size):
        problems.append(f"image_size {index.get('image_size')} != expected {list(image_size)}")
    if views_per_sample is not None and index.get("views_per_sample") != views_per_sample:
        problems.append(f"views_per_sample {index.get('views_per_sample')} != expected "
                        f"{views_per_sample}")
    if problems:
        raise ValueError(f"{where} ({index.get('split')}) is incompatible: " + "; ".join(problems)
                         + ". Rebuild the cache with the current params (dvc repro cache).")


def check_same_build(train_index: dict, val_index: dict, cache_dir: str | Path) -> None:
    """``CacheError`` unless both splits carry the same build fingerprint (one build, swapped
    in together)."""
    if train_index.get("fingerprint") != val_index.get("fingerprint"):
        raise CacheError(f"the train and val splits come from different builds (fingerprints "
                         f"{train_index.get('fingerprint')} and {val_index.get('fingerprint')})"
                         ": rebuild the cache (dvc repro cache)", str(cache_dir))


def collate_samples(samples: list[dict]) -> dict[str, Any]:
    """Stack decoded samples to ``[B,N,...]``; ``key``/``meta`` become lists. Ground-truth keys
    are kept only when every sample has them (sources without ground truth may be mixed)."""
    import torch

    if not samples:
        raise ValueError("collate_samples: empty batch")
    common = set(samples[0]).intersection(*samples[1:])
    batch: dict[str, Any] = {"key": [s["key"] for s in samples],
                             "meta": [s["meta"] for s in samples]}
    for name in sorted(n for n in common - {"key", "meta"} if not n.startswith("__")):
        shapes = {tuple(s[name].shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"collate_samples: {name} shapes differ in the batch: "
                             f"{sorted(shapes)} (keys {batch['key']})")
        batch[name] = torch.stack([s[name] for s in samples])
    return batch
