"""Read the teacher cache: index, shard list, a WebDataset pipeline of decoded samples, batches.

``cache_dataset`` splits shards by DDP rank (``wds.split_by_node``) and then by DataLoader worker
(``wds.split_by_worker``), so every sample is read exactly once per epoch across all ranks and
workers, provided there are at least ``world_size * num_workers`` shards. In WebDataset 1.0.2
the shard shuffle runs after the split: a rank always reads the same shards (only their order
and the sample order change), so the per-rank sample count is fixed and known from
``index.json``: ``samples_per_rank`` gives it, for a data module that must give every rank the
same number of batches (e.g. ``min(samples_per_rank(...)) // batch_size`` batches per epoch).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from distill3r.cache.schema import FORMAT, INDEX_NAME, decode_sample, read_json_or_none
from distill3r.data.sampling import stable_seed

__all__ = ["read_index", "list_shards", "cache_dataset", "collate_samples", "check_compatible",
           "samples_per_rank", "shard_sample_counts", "decode_sample", "CorruptShardError",
           "shard_samples"]


class CorruptShardError(ValueError):
    """A shard that cannot be read as a tar (truncated, overwritten...)."""

    def __str__(self) -> str:  # WebDataset appends context to args; keep the message readable
        return str(self.args[0]) if self.args else ""


def read_index(split_dir: str | Path) -> dict:
    """``<split_dir>/index.json`` (``ValueError`` naming the file if missing or invalid)."""
    path = Path(split_dir) / INDEX_NAME
    index = read_json_or_none(path)
    if index is None:
        raise ValueError(f"{path}: cache index missing or unreadable (run the cache stage)")
    if index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path}: not a {FORMAT} index (format {index.get('format')!r})")
    return index


def list_shards(split_dir: str | Path) -> list[str]:
    """Absolute paths of the split's shards in index order; every listed shard must exist."""
    split_dir = Path(split_dir).resolve()
    index = read_index(split_dir)
    paths = [split_dir / s["name"] for s in index["shards"]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{split_dir}: shard(s) listed in {INDEX_NAME} are missing: "
                         f"{', '.join(missing[:5])}")
    return [str(p) for p in paths]


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


def samples_per_rank(index: dict, world_size: int, num_workers: int = 0) -> list[int]:
    """Samples each DDP rank reads per epoch (shards ``rank::world_size``, as split_by_node).

    ``ValueError`` if some rank (or DataLoader worker) would get no shard at all."""
    counts = [int(s["samples"]) for s in index["shards"]]
    need = world_size * max(1, num_workers)
    if len(counts) < need:
        raise ValueError(f"cache split {index.get('split')!r} has {len(counts)} shard(s); "
                         f"{world_size} rank(s) x {max(1, num_workers)} worker(s) need at least "
                         f"{need}: lower cache.shard_max_samples and rebuild")
    return [sum(counts[r::world_size]) for r in range(world_size)]


def _member_key(name: str) -> str:
    return Path(name).name.split(".", 1)[0]


def _find_member_error(url: str) -> str:
    """Where a tar stops being readable (diagnostics on the error path only)."""
    last = current = None
    try:
        with tarfile.open(url, mode="r|") as tar:  # shards are plain tars (offsets below)
            for info in tar:
                current = info.name
                f = tar.extractfile(info)
                if f is not None:
                    f.read()
                last, current = info.name, None
    except (tarfile.TarError, OSError, EOFError) as exc:
        if current is not None:
            return f"in member {current!r} (sample {_member_key(current)}): {exc}"
        if last is not None:
            return f"after member {last!r} (sample {_member_key(last)}): {exc}"
        return f"at its first header: {exc}"
    return "no error on a second read"


def _raise_corrupt_shard(exn: Exception) -> bool:
    """WebDataset handler: turn tar errors into ``CorruptShardError`` naming shard and key."""
    if isinstance(exn, ValueError):
        raise exn
    url = next((a for a in exn.args if isinstance(a, str) and a.endswith(".tar")), None)
    if url is None:  # inner tar iterator: re-raise so the expander adds the shard url
        raise exn
    raise CorruptShardError(f"{url}: truncated or corrupt shard, {_find_member_error(url)}") \
        from exn


def shard_samples(path: str | Path) -> Iterator[dict]:
    """Raw samples of one shard in stored order (member name -> bytes, ``__key__``,
    ``__url__``); a truncated or corrupt tar raises ``CorruptShardError`` naming the shard and
    the sample where reading stopped (WebDataset's own tar reader ends silently there)."""
    url = str(path)
    sample: dict | None = None
    current = None
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                current = info.name
                key, _, member = Path(info.name).name.partition(".")
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise EOFError(f"{len(data)} of {info.size} bytes")
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                sample[member] = data
                current = None
            end = tar.offset
        with open(url, "rb") as f:  # a tar cut at a member boundary just looks shorter
            f.seek(end)
            if f.read(512) != bytes(512):
                raise EOFError("no end-of-archive marker")
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = (f"in member {current!r} (sample {_member_key(current)})" if current
                 else f"after sample {sample['__key__']}" if sample else "at its first header")
        raise CorruptShardError(f"{url}: truncated or corrupt shard, {where}: {exc}") from exc
    if sample is not None:
        yield sample


def cache_dataset(split_dir: str | Path, shuffle: bool, seed: int, *, epoch: int = 0,
                  shuffle_buffer: int = 256, decode: bool = True):
    """A WebDataset pipeline over the split's shards yielding decoded samples (``decode_sample``).

    Args:
        shuffle: shuffle shard order and samples (buffer ``shuffle_buffer``) — for training.
        seed, epoch: the shuffles are seeded from ``(seed, epoch)``: pass the epoch (or rebuild
            the pipeline each epoch) for a new order every epoch; reruns are reproducible.
        decode: False yields raw byte samples (for throughput measurements).
    """
    import webdataset as wds

    urls = list_shards(split_dir)
    if not urls:
        raise ValueError(f"{split_dir}: the cache split has no shards (no samples)")
    mixed = stable_seed(seed, epoch)
    dataset = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False,
                             nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                             seed=mixed, handler=_raise_corrupt_shard, empty_check=False)
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 64), seed=mixed + 1)
    return dataset.map(decode_sample) if decode else dataset


def collate_samples(samples: list[dict]) -> dict[str, Any]:
    """Stack decoded samples to ``[B,N,...]``; ``key``/``meta`` become lists. Ground-truth keys
    are kept only when every sample has them (sources without ground truth may be mixed);
    WebDataset's ``__key__``/``__url__`` entries are dropped."""
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


def shard_sample_counts(index: dict) -> np.ndarray:
    """Samples per shard, in index order."""
    return np.array([int(s["samples"]) for s in index["shards"]], dtype=np.int64)
