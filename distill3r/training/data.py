"""Training data: the teacher cache as DDP-safe streams of collated batches.

DDP needs every rank to run the same number of steps per epoch: a rank that runs out of batches
first leaves the others waiting forever in the gradient all-reduce. WebDataset shards are
streams of unknown length, so the epoch length is fixed up front from ``index.json``'s
per-shard sample counts (``T`` samples in all, ``W`` ranks, batch ``b``):

    batches per rank per epoch  B = floor(T / (W * b * a)) * a

(``a`` = gradient accumulation, so every optimiser step gets its ``a`` batches) and every rank
yields exactly ``B`` batches. Within a rank the batches are split over the
DataLoader workers (worker ``k`` of ``K`` yields ``B // K`` or ``B // K + 1``), each worker
collates its own batches and the loader runs with ``batch_size=None``.

Which samples a (rank, worker) reads: the split's shards, concatenated in a per-epoch order,
form one virtual sequence of ``T`` positions. Rank ``r`` owns the ``B * b`` positions starting
at ``offset + r * (T // W)`` (modulo ``T``) and hands consecutive runs of them to its workers.
So ranks and workers read disjoint samples, nobody repeats a sample within an epoch, and each
reader opens only the shards overlapping its run (it skips, undecoded, the samples before its
start in the first one). This works for any number of shards, even fewer than ranks x workers,
and the at most ``T - W * B * b`` samples left out change every epoch.

- train: shard order permuted and ``offset`` drawn from ``(seed, epoch)``; each worker
  shuffles its run with a seeded buffer; ``len()`` is ``B``. The order is a pure function of
  ``(seed, epoch)``, so a run resumed mid-epoch skips the batches it already trained on and
  sees exactly what the uninterrupted run would have seen.
- validation: shards in index order, ``offset = 0``, no shuffle; every rank gets
  ``ceil(T / W)`` positions (wrapping around to the start to pad), in the last batch possibly
  fewer than ``b``, so all ranks run the same number of batches in a fixed order.

Every DataLoader has its own seeded ``generator``: starting an iterator draws the workers' base
seed from it, and drawn from torch's global RNG (the default) each validation pass would shift
the stream the student's random image indices come from, so the trained weights would depend on
how often training validates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill3r.cache.reader import (Shard, check_compatible, check_same_build, collate_samples,
                                    decode_sample, read_range, split_shards)
from distill3r.config import Params
from distill3r.models import get_config
from distill3r.seeding import stable_seed
from distill3r.teachers import get_teacher

__all__ = ["Shard", "split_shards", "read_range", "shuffled", "check_cache", "CacheBatches",
           "CacheDataModule", "expected_teacher_fingerprint"]
SHUFFLE_BUFFER = 64


def shuffled(samples: Iterator, buffer: int, rng: np.random.Generator) -> Iterator:
    """A seeded buffer shuffle (deterministic for a given input order and generator)."""
    pool: list = []
    for sample in samples:
        pool.append(sample)
        if len(pool) >= buffer:
            yield pool.pop(int(rng.integers(len(pool))))
    while pool:
        yield pool.pop(int(rng.integers(len(pool))))


def expected_teacher_fingerprint(params: Params) -> Optional[str]:
    """The teacher fingerprint the cache stage would record for ``params.teacher`` when it is
    cheap to know: the ground-truth teacher, and a checkpoint teacher whose model folder is here
    (its weights hash and the hash of the model code, so a cache built before a model-code
    change is refused). None for a teacher whose identity needs its weights (Fast3R: resolving
    them may download the checkpoint) or whose folder is absent (a cache pulled without the
    teacher): then only the teacher's name is checked."""
    teacher = params.teacher
    cheap = teacher.name == "groundtruth" or (
        teacher.name == "checkpoint" and (Path(teacher.checkpoint) / "config.json").is_file())
    return get_teacher(teacher).fingerprint() if cheap else None


def check_cache(train_index: dict, val_index: dict, params: Params, cache_dir: Path) -> None:
    """``ValueError`` unless both splits come from the teacher of ``params.teacher`` (name, and
    fingerprint where cheap) at ``cache.image_size`` (a multiple of the student's patch), with
    at least ``train.views`` views per sample, and agree with each other."""
    patch = get_config(params.model.name).patch_size
    fingerprint = expected_teacher_fingerprint(params)
    for split, index in (("train", train_index), ("val", val_index)):
        where = str(Path(cache_dir) / split / "index.json")
        built = index.get("teacher") or {}
        if (built.get("name") == params.teacher.name == "checkpoint"
                and fingerprint not in (None, built.get("fingerprint"))):
            raise ValueError(
                f"{where}: cache built by checkpoint teacher {built.get('fingerprint')!r}, but "
                f"{params.teacher.checkpoint} with this code is {fingerprint!r}: the teacher's "
                "weights or the model code (distill3r/models) changed since. Rebuild the cache "
                "(dvc repro --force cache; list distill3r/models and the teacher folder in the "
                "cache stage's deps so that dvc repro does it)")
        check_compatible(index, fingerprint, params.cache.image_size, where=where)
        name = (index.get("teacher") or {}).get("name")
        if name != params.teacher.name:
            raise ValueError(f"{where}: cache built by teacher {name!r} but teacher.name is "
                             f"{params.teacher.name!r}: rebuild the cache (dvc repro cache)")
        if any(s % patch for s in index["image_size"]):
            raise ValueError(f"{where}: image size {index['image_size']} is not a multiple of "
                             f"the student's patch size {patch}")
        views = int(index.get("views_per_sample") or 0)
        if params.train.views is not None and views < params.train.views:
            raise ValueError(f"{where}: {views} views per sample < train.views "
                             f"{params.train.views}")
    differ = [k for k in ("image_size", "views_per_sample")
              if train_index.get(k) != val_index.get(k)]
    if (train_index.get("teacher") or {}).get("fingerprint") != \
            (val_index.get("teacher") or {}).get("fingerprint"):
        differ.append("teacher fingerprint")
    if differ:
        raise ValueError(f"{cache_dir}: the train and val splits differ in {', '.join(differ)}:"
                         " rebuild the cache")
    check_same_build(train_index, val_index, cache_dir)


class CacheBatches(IterableDataset):
    """Collated batches of one cache split for one rank; ``len()`` is the batches per epoch.

    Args:
        shards: the split's shards with their sample counts (:func:`split_shards`).
        batch_size: samples per batch (per rank).
        rank, world_size: this process in the DDP group.
        train: shuffled, fixed-length epochs; else every sample in a fixed order (see above).
        seed, epoch: the order, shuffle and augmentation seeds of this epoch.
        transform: ``(decoded sample, epoch) -> sample`` (augmentation), or None.
        accumulate: training batches per optimiser step (the epoch length is a multiple).
        skip_batches: leave out the first batches of the epoch (as the loader interleaves
            the workers' batches): a run resumed mid-epoch continues the interrupted epoch
            with the batches it had not seen yet; ``len()`` stays the full epoch.
    """

    def __init__(self, shards: list[Shard], batch_size: int, rank: int = 0, world_size: int = 1,
                 train: bool = True, seed: int = 0, epoch: int = 0,
                 transform: Optional[Callable[[dict, int], dict]] = None,
                 accumulate: int = 1, skip_batches: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.batch_size = list(shards), batch_size
        self.rank, self.world_size, self.train = rank, world_size, train
        self.seed, self.epoch, self.transform = seed, epoch, transform
        self.skip_batches = skip_batches
        self.total = sum(s.num_samples for s in self.shards)
        if train:
            steps = self.total // (world_size * batch_size * accumulate)
            if steps == 0:
                raise ValueError(f"{self.total} training samples cannot fill one optimiser "
                                 f"step ({accumulate} batch(es) of {batch_size}) on each of "
                                 f"{world_size} rank(s): lower train.batch_size or add data")
            self.num_batches = steps * accumulate
            self.rank_samples = self.num_batches * batch_size
        else:
            self.rank_samples = math.ceil(self.total / world_size)
            self.num_batches = math.ceil(self.rank_samples / batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def _order(self) -> tuple[list[Shard], int]:
        """``(shards in this epoch's order, first position of this rank)``."""
        if not self.train:
            return self.shards, self.rank * self.rank_samples
        rng = np.random.default_rng([self.seed, self.epoch])
        order = [self.shards[i] for i in rng.permutation(len(self.shards))]
        offset = int(rng.integers(self.total))
        return order, offset + self.rank * (self.total // self.world_size)

    def worker_batches(self, worker: int, workers: int) -> Iterator[list[dict]]:
        """Raw sample lists, one per batch that DataLoader worker ``worker`` of ``workers``
        yields; the ``workers`` of one rank together yield ``len(self)`` batches.

        The loader takes batches from its workers in turn, so loader batch ``i`` is batch
        ``i // K`` of worker ``i % K``. Each worker owns a contiguous run of the rank's range.
        With ``skip_batches = s`` the loader still starts with worker 0, so worker ``w`` plays
        the part of worker ``(w + s) % K`` and drops that part's first ``(w + s) // K`` batches.
        """
        part, skip = (worker + self.skip_batches) % workers, (worker + self.skip_batches) // workers
        counts = [self.num_batches // workers + (k < self.num_batches % workers)
                  for k in range(workers)]
        first = sum(counts[:part])
        sizes = [min(self.batch_size, self.rank_samples - b * self.batch_size)
                 for b in range(first, first + counts[part])]
        if len(sizes) <= skip:
            return
        order, rank_start = self._order()
        stream = read_range(order, rank_start + first * self.batch_size, sum(sizes))
        if self.train:
            stream = shuffled(stream, SHUFFLE_BUFFER, np.random.default_rng(
                [self.seed, self.epoch, self.rank, part]))
        for i, size in enumerate(sizes):
            batch = [next(stream) for _ in range(size)]  # skipped ones are read, not decoded
            if i >= skip:
                yield batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for raws in self.worker_batches(worker, workers):
            samples = [decode_sample(raw, self.shards[0].shape) for raw in raws]
            if self.transform is not None:
                samples = [self.transform(s, self.epoch) for s in samples]
            yield collate_samples(samples)


class CacheDataModule(L.LightningDataModule):
    """Train and validation loaders over two cache split folders (``<cache>/train``,
    ``<cache>/val``). The folders are checked at construction (:func:`split_shards`); rank and
    world size come from the trainer. The train loader is rebuilt every epoch (the trainer must
    use ``reload_dataloaders_every_n_epochs=1``) so the shard deal and shuffle change per epoch.
    """

    def __init__(self, train_dir: str | Path, val_dir: str | Path, batch_size: int,
                 num_workers: int = 0, seed: int = 0,
                 augment: Optional[Callable[[dict, int], dict]] = None,
                 accumulate: int = 1) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {num_workers}")
        self.train_index, self.train_shards = split_shards(train_dir)
        self.val_index, self.val_shards = split_shards(val_dir)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.augment, self.accumulate = seed, augment, accumulate

    def check_world(self, world_size: int) -> int:
        """Training batches per rank per epoch for ``world_size`` ranks (``ValueError`` when
        the split cannot fill one batch per rank): call before starting anything costly."""
        return len(CacheBatches(self.train_shards, self.batch_size, 0, world_size,
                                accumulate=self.accumulate))

    def _loader(self, dataset: CacheBatches, *stream: int | str) -> DataLoader:
        pin = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        generator = torch.Generator().manual_seed(stable_seed("loader", self.seed, *stream))
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          pin_memory=pin, generator=generator)

    def _rank(self) -> tuple[int, int]:
        return (0, 1) if self.trainer is None else (self.trainer.global_rank,
                                                    self.trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        epoch = 0 if self.trainer is None else self.trainer.current_epoch
        dataset = CacheBatches(self.train_shards, self.batch_size, rank, world, train=True,
                               seed=self.seed, epoch=epoch, transform=self.augment,
                               accumulate=self.accumulate)
        if self.trainer is not None:  # resumed mid-epoch: skip the batches already trained on
            done = self.trainer.global_step * self.accumulate - epoch * len(dataset)
            dataset.skip_batches = done if 0 < done < len(dataset) else 0
        return self._loader(dataset, "train", epoch)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        return self._loader(CacheBatches(self.val_shards, self.batch_size, rank, world,
                                         train=False, seed=self.seed), "val")
