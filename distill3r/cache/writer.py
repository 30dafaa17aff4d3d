"""Build the teacher cache: manifest -> view samples -> teacher -> WebDataset shards + index.

Layout of ``out_dir``::

    <split>/shard-000000.tar ...   complete shards (split in train, val), plain ustar tars
    <split>/index.json             shard names, sample counts and sizes, teacher, params,
                                   fingerprint (the same in both splits of one build)

Builds stage beside ``out_dir`` and swap both splits in at once (``swap.py``).

Guarantees:
- Deterministic: the samples, their assignment to shards and (for a deterministic teacher) the
  shard bytes are a pure function of the manifest and the ``cache``/``teacher`` params. The
  number of samples per shard is fixed up front (``shard_max_samples``, lowered so that an upper
  bound of the encoded sample size keeps a shard under ``shard_max_bytes``), never from measured
  sizes, so independent parts agree on every shard's contents.
- Atomic and resumable: a shard is written to ``.shard-N.tar.tmp-<pid>.tar``, then renamed. A
  rerun after an interruption (even SIGKILL) deletes stale temp files and builds only missing
  shards.
- Parts: ``shard_index=i, num_shards=k`` builds the shards with ``N % k == i``; the index step
  (``finalize_cache``; automatic when every shard exists) writes both ``index.json`` files and
  swaps the staged cache into place in one step. A build with other params (another
  fingerprint) stages separately, so complete caches are never mixed with or overwritten by a
  failed run, and a second build into the same folder while one runs stops with a clear error.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill3r import __version__
from distill3r.atomic import replacing
from distill3r.cache.schema import (FORMAT, INDEX_NAME, MAX_SAMPLE_PIXELS, encode_sample,
                                    sample_nbytes_bound)
from distill3r.cache.swap import (CACHE_SUBDIR, SWAP_FILE, build_lock, built_fingerprint, cleanup,
                                  flocked, recover, staging_path, swap_in)
from distill3r.config import CacheParams, to_dict
from distill3r.data.io import read_depth, read_image
from distill3r.data.view import resize_crop
from distill3r.data.manifest import SPLITS, group_scenes, read_manifest
from distill3r.data.sampling import SamplingRule, ViewSample, dataset_rules, sample_scenes
from distill3r.jsonio import write_json
from distill3r.teachers import Teacher, TeacherInput, get_teacher
from distill3r.teachers.base import params_digest

log = logging.getLogger(__name__)


def shard_name(n: int) -> str:
    return f"shard-{n:06d}.tar"


@dataclass
class CachePlan:
    """Everything a build decides before running the teacher."""

    fingerprint: str
    shards: dict[str, list[list[ViewSample]]]  # split -> shard -> samples
    samples_per_shard: int
    skipped: list[dict]
    manifest_sha256: str
    manifest_dir: Path
    cache: CacheParams
    teacher: Teacher


def plan_cache(manifest_csv: str | Path, cache: CacheParams, teacher: Teacher) -> CachePlan:
    """Sample views and cut the samples of each split into shards (no teacher calls)."""
    manifest_csv = Path(manifest_csv)
    if len(cache.image_size) != 2 or min(cache.image_size) < 1:
        raise ValueError(f"cache.image_size must be [H, W], got {cache.image_size}")
    px = cache.views_per_sample * cache.image_size[0] * cache.image_size[1]
    if px > MAX_SAMPLE_PIXELS:
        raise ValueError(f"cache: {cache.views_per_sample} views of {cache.image_size} are {px} "
                         f"pixels per sample, above the readers' ceiling {MAX_SAMPLE_PIXELS}")
    base = SamplingRule(cache.sampling, cache.views_per_sample, cache.max_samples_per_scene,
                        cache.frame_stride, cache.neighbours)
    rules = dataset_rules(base, cache.dataset_sampling)  # params errors before the manifest
    groups = group_scenes(read_manifest(manifest_csv))
    teacher.check_frames(groups)  # e.g. ground truth without depth: fail before any shard
    samples, skipped = sample_scenes(groups, base, rules, cache.seed)
    H, W = cache.image_size
    bound = sample_nbytes_bound(cache.views_per_sample, H, W)
    per_shard = max(1, min(cache.shard_max_samples, cache.shard_max_bytes // bound))
    if cache.shard_max_bytes < bound:
        log.warning("cache.shard_max_bytes=%d is below one sample (<= %d bytes): one sample per "
                    "shard", cache.shard_max_bytes, bound)
    shards: dict[str, list[list[ViewSample]]] = {}
    for split in SPLITS:
        mine = [s for s in samples if s.split == split]
        shards[split] = [mine[i:i + per_shard] for i in range(0, len(mine), per_shard)]
    manifest_sha = hashlib.sha256(manifest_csv.read_bytes()).hexdigest()
    cache_params = to_dict(cache)
    if cache_params["compression"] == "deflate":  # the bytes of caches built before the key
        del cache_params["compression"]            # existed: they keep their fingerprint
    fingerprint = params_digest({"format": FORMAT, "cache": cache_params,
                                 "teacher": teacher.fingerprint(), "manifest": manifest_sha})
    return CachePlan(fingerprint, shards, per_shard, skipped, manifest_sha,
                     manifest_csv.parent.resolve(), cache, teacher)


# ---------------------------------------------------------------------------------------------
# One sample, one shard
# ---------------------------------------------------------------------------------------------
def load_sample(sample: ViewSample, size: tuple[int, int]) -> tuple[TeacherInput, dict | None]:
    """Read and resize the frames of ``sample`` to the cache resolution (never stretched)."""
    images, depths, Ks = [], [], []
    for r in sample.frames:
        image = read_image(r.image)
        depth = read_depth(r.depth) if r.depth is not None else None
        if depth is not None and depth.shape != image.shape[:2]:
            raise ValueError(f"{r.depth}: depth size {depth.shape} differs from image {r.image} "
                             f"{image.shape[:2]}")
        img, K, d = resize_crop(image, size, K=r.K, depth=depth)
        images.append(img)
        depths.append(d)
        Ks.append(K)
    has = {"depth": all(d is not None for d in depths), "K": all(k is not None for k in Ks),
           "c2w": all(r.c2w is not None for r in sample.frames)}
    batch = TeacherInput(
        images=np.stack(images), image_paths=[r.image for r in sample.frames],
        depth=np.stack(depths).astype(np.float32) if has["depth"] else None,
        K=np.stack(Ks) if has["K"] else None,
        c2w=np.stack([r.c2w for r in sample.frames]) if has["c2w"] else None, key=sample.key)
    gt = {"depth": batch.depth, "K": batch.K, "c2w": batch.c2w} if all(has.values()) else None
    return batch, gt


def _meta(plan: CachePlan, sample: ViewSample) -> dict:
    return {"dataset": sample.dataset, "scene": sample.scene, "split": sample.split,
            "sample": sample.sample_id, "frames": sample.frame_ids,
            "sources": [os.path.relpath(r.image, plan.manifest_dir) for r in sample.frames],
            "teacher": plan.teacher.name, "teacher_fingerprint": plan.teacher.fingerprint(),
            "image_size": list(plan.cache.image_size)}


def write_shard(plan: CachePlan, samples: list[ViewSample], path: Path, bar=None) -> None:
    """Write ``samples`` to ``path`` atomically (``atomic.replacing``: temporary name, fsync,
    rename) as a plain ustar tar, members sorted by name within each sample."""
    import webdataset as wds

    size = tuple(plan.cache.image_size)
    with replacing(path, fsync=True) as tmp:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=0, user="distill3r", group="distill3r",
                               mode=0o644) as tar:  # int mtime: no pax headers
                for sample in samples:
                    batch, gt = load_sample(sample, size)
                    out = plan.teacher.predict(batch)
                    tar.write(encode_sample(sample.key, out, batch.images, gt,
                                            _meta(plan, sample), plan.cache.conf_max,
                                            plan.cache.compression))
                    if bar is not None:
                        bar.update(1)


# ---------------------------------------------------------------------------------------------
# Index, swap
# ---------------------------------------------------------------------------------------------
def _index(plan: CachePlan, split: str, folder: Path) -> dict:
    shards = [{"name": shard_name(n), "samples": len(s),
               "bytes": (folder / shard_name(n)).stat().st_size}
              for n, s in enumerate(plan.shards[split])]
    return {"format": FORMAT, "split": split, "fingerprint": plan.fingerprint,
            "num_samples": sum(s["samples"] for s in shards), "shards": shards,
            "samples_per_shard": plan.samples_per_shard,
            "image_size": list(plan.cache.image_size),
            "views_per_sample": plan.cache.views_per_sample,
            "teacher": plan.teacher.describe(), "cache_params": to_dict(plan.cache),
            "manifest_sha256": plan.manifest_sha256,
            "skipped_scenes": [s for s in plan.skipped if s["split"] == split],
            "distill3r_version": __version__}


def finalize_cache(plan: CachePlan, out_dir: str | Path, _locked: bool = False) -> bool:
    """Index step: when every shard of the plan is staged, write each split's ``index.json``
    and swap the staged cache in for ``out_dir`` (both splits in one step). Returns False if
    shards are missing. Holds the build lock (``ValueError`` if another build holds it)."""
    out = Path(out_dir)
    with contextlib.nullcontext() if _locked else build_lock(out):
        recover(out)
        if built_fingerprint(out) == plan.fingerprint:
            cleanup(out)
            return True
        staging = staging_path(out, plan.fingerprint)
        root = staging / CACHE_SUBDIR
        missing = [f"{s}/{shard_name(n)}" for s in SPLITS for n in range(len(plan.shards[s]))
                   if not (root / s / shard_name(n)).is_file()]
        if missing:
            log.info("cache not complete yet: %d shard(s) missing (e.g. %s)", len(missing),
                     missing[0])
            return False
        for split in SPLITS:
            folder = root / split
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.tmp*"):  # e.g. an index.json.tmp of a killed run
                stale.unlink()
            write_json(folder / INDEX_NAME, _index(plan, split, folder), indent=1, sort_keys=True)
        write_json(staging / SWAP_FILE, {"fingerprint": plan.fingerprint})
        swap_in(staging, out)
        log.info("cache complete: %s", out)
        cleanup(out)
    return True


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def build_cache(manifest_csv: str | Path, out_dir: str | Path, params, shard_index: int = 0,
                num_shards: int = 1, progress: bool = True, teacher: Teacher | None = None,
                finalize: bool = True) -> dict:
    """Build (part of) the cache; see the module docstring.

    Args:
        params: an object with ``.cache`` (CacheParams) and ``.teacher`` (TeacherParams).
        shard_index, num_shards: build only shards ``N`` with ``N % num_shards == shard_index``.
        teacher: use this teacher instead of ``get_teacher(params.teacher)``.
        finalize: run the index step when every shard exists (always tried when possible).
    Returns:
        ``{"fingerprint", "built", "skipped_shards", "complete", "shards",
        "samples_per_shard"}``: ``built`` shards written by this call, ``skipped_shards``
        shards of this part found already staged, ``complete`` whether the cache is in place,
        ``shards`` the shard count per split.
    Raises:
        ValueError: bad params or input, or another build into ``out_dir`` is running.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}")
    teacher = teacher or get_teacher(params.teacher)
    plan = plan_cache(manifest_csv, params.cache, teacher)
    out = Path(out_dir)
    whole = num_shards == 1
    staging = staging_path(out, plan.fingerprint)
    built, todo = 0, []
    with build_lock(out, shared=not whole):
        if whole:
            recover(out)
        if built_fingerprint(out) != plan.fingerprint:
            for split in SPLITS:
                (staging / CACHE_SUBDIR / split).mkdir(parents=True, exist_ok=True)
                todo += [(split, n, samples) for n, samples in enumerate(plan.shards[split])
                         if n % num_shards == shard_index]
        if todo:
            built = _build_part(plan, staging, todo, shard_index, num_shards, progress,
                                out if whole else None)
        complete = finalize_cache(plan, out, _locked=True) if finalize and whole else False
    if finalize and not whole:
        try:
            complete = finalize_cache(plan, out)
        except ValueError as exc:  # another part still builds (it finalises when done)
            log.info("index step left to another process: %s", exc)
    if finalize and whole and not complete:
        raise AssertionError("single-part cache build left shards missing")
    return {"fingerprint": plan.fingerprint, "built": built,
            "skipped_shards": len(todo) - built, "complete": complete,
            "shards": {s: len(plan.shards[s]) for s in SPLITS},
            "samples_per_shard": plan.samples_per_shard}


def _build_part(plan: CachePlan, staging: Path, todo: list, shard_index: int, num_shards: int,
                progress: bool, clean_out: Path | None) -> int:
    """Write the missing shards of ``todo`` into ``staging``; returns how many were written."""
    from distill3r.progress import progress_bar

    root = staging / CACHE_SUBDIR
    with flocked(staging / f"part-{shard_index}-of-{num_shards}.lock",
                 "another process is already building this part"):
        if clean_out is not None:
            cleanup(clean_out, keep=staging.name)
        for split, n, _ in todo:
            for stale in (root / split).glob(f".{shard_name(n)}.tmp-*"):
                stale.unlink()
        pending = [t for t in todo if not (root / t[0] / shard_name(t[1])).is_file()]
        with progress_bar(total=sum(len(t[2]) for t in pending), disable=not progress,
                          unit="sample", desc=f"cache part {shard_index}/{num_shards}") as bar:
            for split, n, samples in pending:
                write_shard(plan, samples, root / split / shard_name(n), bar)
    return len(pending)
