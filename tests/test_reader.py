"""Reading the cache: the one reader (index order, counts checked); corrupt input -> CacheError."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from boxroom import make_box_room_manifest

from distill3r.cache.reader import (CacheError, check_compatible, collate_samples,
                                    decode_sample, read_index, read_split, shard_samples,
                                    split_shards)
from distill3r.cache.schema import npz_bytes, sample_digest
from distill3r.cache.writer import build_cache
from distill3r.config import CacheParams, Params

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
    """Rewrite a shard (and its size in index.json) as the writer would."""
    import webdataset as wds
    with wds.TarWriter(str(path), encoder=False, mtime=0) as tar:
        for s in samples:
            tar.write({k: v for k, v in s.items() if k != "__url__"})
    index = json.loads((path.parent / "index.json").read_text())
    next(e for e in index["shards"] if e["name"] == path.name)["bytes"] = path.stat().st_size
    (path.parent / "index.json").write_text(json.dumps(index))


def _truncated_copy(cache: Path, tmp_path: Path) -> Path:
    """A copy of the train split whose second shard is cut at 60 %."""
    split = tmp_path / "train"
    shutil.copytree(cache / "train", split)
    shard = split / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    return split


def test_truncated_shard_named_by_the_index_check(cache, tmp_path):
    split = _truncated_copy(cache, tmp_path)
    with pytest.raises(CacheError, match=r"shard-000001\.tar: \d+ bytes, index.json lists"):
        list(read_split(split))


def test_reader_names_the_member_where_a_shard_is_cut(cache, tmp_path):
    split = _truncated_copy(cache, tmp_path)
    with pytest.raises(CacheError, match=r"shard-000001\.tar: member "
                                         r"boxroom__scene_\d+__s\d+\.\w+(\.npz)?: .*truncated"):
        list(shard_samples(split / "shard-000001.tar", 2, (3, 28, 28)))


def test_missing_member_names_shard_and_key(cache, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(cache / "train", split)
    samples = _raw_samples(split / "shard-000000.tar")
    del samples[1]["teacher.npz"]
    _write_shard(split / "shard-000000.tar", samples)
    key = samples[1]["__key__"]
    with pytest.raises(CacheError, match=rf"shard-000000\.tar: sample {key}: member "
                                         r"teacher\.npz: missing"):
        list(read_split(split))


def _tampered(cache, **changes) -> dict:
    raw = _raw_samples(cache / "train" / "shard-000000.tar")[0]
    with np.load(io.BytesIO(raw["teacher.npz"]), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    raw["teacher.npz"] = npz_bytes(arrays)
    raw["sha256"] = sample_digest(raw).encode()  # a consistent but wrong sample
    return raw


@pytest.mark.parametrize("change, message", [
    ("nan", "teacher.npz: array xyz_global has non-finite values"),
    ("shape", r"teacher.npz: array conf_global must have shape \[3, 28, 28\]"),
    ("rle", "teacher.npz: corrupt RLE"),
    ("conf", "teacher.npz: array conf_global has values below 1"),
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


def _signed(raw: dict, **members) -> dict:
    raw = dict(raw, **members)
    raw["sha256"] = sample_digest(raw).encode()
    return raw


def test_unreadable_members(cache):
    raw = _raw_samples(cache / "train" / "shard-000000.tar")[0]
    assert decode_sample(dict(raw))["images"].shape == (3, 3, 28, 28)
    with pytest.raises(CacheError, match="member sha256: checksum mismatch"):
        decode_sample(dict(raw, **{"meta.json": raw["meta.json"].replace(b"train", b"trail")}))
    with pytest.raises(CacheError, match="member images.npz: not a readable npz"):
        decode_sample(_signed(raw, **{"images.npz": b"garbage"}))
    with pytest.raises(CacheError, match="member meta.json: not valid JSON"):
        decode_sample(_signed(raw, **{"meta.json": b"{"}))
    pickled = io.BytesIO()
    np.savez(pickled, images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CacheError, match="member images.npz: array images must be uint8"):
        decode_sample(_signed(raw, **{"images.npz": pickled.getvalue()}))


def test_index_checks_and_collate(cache, tmp_path):
    index = read_index(cache / "train")
    check_compatible(index, index["teacher"]["fingerprint"], [28, 28], 3)
    with pytest.raises(ValueError, match="image_size"):
        check_compatible(index, image_size=[56, 56])
    with pytest.raises(ValueError, match="teacher fingerprint"):
        check_compatible(index, teacher_fingerprint="fast3r-v1-0")
    with pytest.raises(ValueError, match="index missing"):
        read_index(tmp_path)
    split = tmp_path / "train"
    shutil.copytree(cache / "train", split)
    (split / "shard-000002.tar").unlink()
    with pytest.raises(CacheError, match="shard-000002.tar: shard listed in index.json is missing"):
        split_shards(split)
    samples = list(read_split(cache / "val"))
    batch = collate_samples(samples)
    assert batch["xyz_global"].shape == (2, 3, 28, 28, 3) and batch["mask"].dtype == torch.bool
    assert len(batch["key"]) == 2 and batch["meta"][0]["split"] == "val" and "K" in batch
    del samples[0]["K"]
    assert "K" not in collate_samples(samples) and "depth" in collate_samples(samples)
