"""Reading the cache: DDP ranks x workers see every sample once; corrupt input -> ValueError."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from boxroom import make_box_room_manifest

from distill3r.cache.reader import (CorruptShardError, cache_dataset, check_compatible,
                                    collate_samples, decode_sample, list_shards, read_index,
                                    samples_per_rank)
from distill3r.cache.schema import npz_bytes
from distill3r.cache.writer import build_cache
from distill3r.config import CacheParams, Params

DDP_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from torch.utils.data import DataLoader
from distill3r.cache.reader import cache_dataset
rank, split_dir, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
keys = []
for epoch in range(2):
    loader = DataLoader(cache_dataset(split_dir, shuffle=True, seed=0, epoch=epoch),
                        batch_size=None, num_workers=2)
    keys.append([s["key"] for s in loader])
json.dump(keys, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    manifest = make_box_room_manifest(root / "raw", num_scenes=6, frames=5, height=32,
                                      width=40, val_scenes=1)
    p = Params()
    p.cache = CacheParams(image_size=[28, 28], views_per_sample=3, max_samples_per_scene=2,
                          shard_max_samples=2)
    build_cache(manifest, root / "cache", p, progress=False)
    return root / "cache"


def _raw_samples(shard: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, member = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key, "__url__": str(shard)})[member] = \
                tar.extractfile(m).read()
    return list(samples.values())


def _write_shard(path: Path, samples: list[dict]) -> None:
    import webdataset as wds
    with wds.TarWriter(str(path), encoder=False) as tar:
        for s in samples:
            tar.write({k: v for k, v in s.items() if k != "__url__"})


@pytest.mark.slow
def test_two_ranks_two_workers_read_each_sample_once(cache, tmp_path):
    split = cache / "train"
    index = read_index(split)
    assert len(index["shards"]) == 5
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    init = f"file://{tmp_path / 'pg'}"
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(r), str(split), init,
                               str(tmp_path / f"keys{r}.json")], env=env) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    keys = [json.loads((tmp_path / f"keys{r}.json").read_text()) for r in range(2)]
    expected = sorted(s["__key__"] for shard in list_shards(split)
                      for s in _raw_samples(Path(shard)))
    for epoch in range(2):
        seen = keys[0][epoch] + keys[1][epoch]
        assert sorted(seen) == expected  # every sample exactly once per epoch
        assert [len(keys[r][epoch]) for r in range(2)] == samples_per_rank(index, 2, 2)
    assert keys[0][0] != keys[0][1]  # a new order each epoch


def _truncated_copy(cache: Path, tmp_path: Path) -> Path:
    """A copy of the train split whose second shard is cut at 60 %."""
    split = tmp_path / "train"
    shutil.copytree(cache / "train", split)
    shard = split / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    return split


def test_truncated_shard_names_shard_and_key(cache, tmp_path):
    split = _truncated_copy(cache, tmp_path)
    with pytest.raises(ValueError, match=r"shard-000001\.tar.*sample boxroom__scene_\d+__s\d+"):
        list(cache_dataset(split, shuffle=False, seed=0))


def test_training_reader_names_a_truncated_shard(cache, tmp_path):
    from distill3r.training.data import read_range, split_shards

    _, shards = split_shards(_truncated_copy(cache, tmp_path))
    total = sum(s.num_samples for s in shards)
    with pytest.raises(CorruptShardError,
                       match=r"shard-000001\.tar: truncated.*sample boxroom__scene_\d+__s\d+"):
        list(read_range(shards, 0, total))


def test_missing_member_names_shard_and_key(cache, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(cache / "train", split)
    samples = _raw_samples(split / "shard-000000.tar")
    del samples[1]["teacher.npz"]
    _write_shard(split / "shard-000000.tar", samples)
    key = samples[1]["__key__"]
    with pytest.raises(ValueError, match=rf"shard-000000\.tar: sample {key}: missing member "
                                         r"teacher\.npz"):
        list(cache_dataset(split, shuffle=False, seed=0))


def _tampered(cache, **changes) -> dict:
    raw = _raw_samples(cache / "train" / "shard-000000.tar")[0]
    with np.load(io.BytesIO(raw["teacher.npz"]), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    raw["teacher.npz"] = npz_bytes(arrays)
    return raw


@pytest.mark.parametrize("change, message", [
    ("nan", "xyz_global has non-finite values"),
    ("shape", r"conf_global must be float16 \[3, 28, 28\]"),
    ("rle", "corrupt RLE"),
    ("conf", "below 1"),
])
def test_corrupt_values_name_shard_and_key(cache, change, message):
    raw = _raw_samples(cache / "train" / "shard-000000.tar")[0]
    with np.load(io.BytesIO(raw["teacher.npz"]), allow_pickle=False) as z:
        xyz, conf = z["xyz_global"].copy(), z["conf_global"].copy()
    if change == "nan":
        xyz[0, 3, 3, 1] = np.nan
        raw = _tampered(cache, xyz_global=xyz)
    elif change == "shape":
        raw = _tampered(cache, conf_global=conf[:, :14])
    elif change == "rle":
        raw = _tampered(cache, mask_rle=np.array([5, 3], np.int32))
    else:
        conf[0, 0, 0] = 0.5
        raw = _tampered(cache, conf_global=conf)
    where = rf"shard-000000\.tar: sample {raw['__key__']}: .*"
    with pytest.raises(ValueError, match=where + message):
        decode_sample(raw)


def test_unreadable_members(cache):
    raw = _raw_samples(cache / "train" / "shard-000000.tar")[0]
    assert decode_sample(dict(raw))["images"].shape == (3, 3, 28, 28)
    with pytest.raises(ValueError, match="images.npz is not a readable npz"):
        decode_sample(dict(raw, **{"images.npz": b"garbage"}))
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        decode_sample(dict(raw, **{"meta.json": b"{"}))
    pickled = io.BytesIO()
    np.savez(pickled, images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="images.npz is not a readable npz"):
        decode_sample(dict(raw, **{"images.npz": pickled.getvalue()}))


def test_index_checks_and_collate(cache, tmp_path):
    index = read_index(cache / "train")
    check_compatible(index, index["teacher"]["fingerprint"], [28, 28], 3)
    with pytest.raises(ValueError, match="image_size"):
        check_compatible(index, image_size=[56, 56])
    with pytest.raises(ValueError, match="teacher fingerprint"):
        check_compatible(index, teacher_fingerprint="fast3r-v1-0")
    assert samples_per_rank(index, 2) == [6, 4]
    with pytest.raises(ValueError, match="at least 6"):
        samples_per_rank(index, 2, num_workers=3)
    with pytest.raises(ValueError, match="index missing"):
        read_index(tmp_path)
    split = tmp_path / "train"
    shutil.copytree(cache / "train", split)
    (split / "shard-000002.tar").unlink()
    with pytest.raises(ValueError, match="shard-000002.tar"):
        list_shards(split)
    samples = list(cache_dataset(cache / "val", shuffle=False, seed=0))
    batch = collate_samples(samples)
    assert batch["xyz_global"].shape == (2, 3, 28, 28, 3) and batch["mask"].dtype == torch.bool
    assert len(batch["key"]) == 2 and batch["meta"][0]["split"] == "val" and "K" in batch
    del samples[0]["K"]
    assert "K" not in collate_samples(samples) and "depth" in collate_samples(samples)
