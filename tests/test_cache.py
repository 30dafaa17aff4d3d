"""View sampling, shard writing (atomic, resumable, parts) and reading back the exact arrays."""

import fcntl
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from boxroom import make_box_room_manifest
from sampling_helpers import sample_views

from distill3r.cache.reader import read_index, read_split
from distill3r.cache.rle import rle_decode
from distill3r.cache.schema import FORMAT, sample_nbytes_bound
from distill3r.cache.writer import build_cache, load_sample, plan_cache
from distill3r.config import CacheParams, Params, to_dict
from distill3r.data.manifest import FrameRecord, group_scenes, read_manifest
from distill3r.data.sampling import sample_key
from distill3r.seeding import stable_seed
from distill3r.teachers import get_teacher
from distill3r.teachers.base import params_digest

REPO = Path(__file__).resolve().parents[1]


def _params(**cache) -> Params:
    p = Params()
    p.cache = CacheParams(**{"image_size": [28, 28], "views_per_sample": 3,
                             "max_samples_per_scene": 2, "shard_max_samples": 2, **cache})
    return p


def _tar_bytes(split_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split_dir.glob("shard-*.tar"))}


def _keys(split_dir: Path) -> list[str]:
    keys = []
    for shard in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_box_room_manifest(tmp_path_factory.mktemp("raw"), num_scenes=3, frames=6)


# ---------------------------------------------------------------------------------------------
# View sampling
# ---------------------------------------------------------------------------------------------
def _groups(frames_per_scene: dict[str, int]):
    recs = [FrameRecord("d.s", "train", scene, i, Path(f"/x/{scene}/{i}.png"))
            for scene, n in frames_per_scene.items() for i in range(n)]
    return group_scenes(recs)


def test_stride_sampling_spreads_windows():
    samples, skipped = sample_views(_groups({"a": 10}), 3, 3, "stride", frame_stride=2)
    assert [s.frame_ids for s in samples] == [[0, 2, 4], [2, 4, 6], [5, 7, 9]]
    assert [s.key for s in samples] == ["d_s__a__s000", "d_s__a__s001", "d_s__a__s002"]
    assert skipped == []


def test_random_sampling_is_stable_and_distinct():
    a, _ = sample_views(_groups({"a": 8, "b": 8}), 4, 5, "random", seed=3)
    b, _ = sample_views(_groups({"b": 8, "a": 8, "c": 9}), 4, 5, "random", seed=3)
    ids = lambda samples, scene: [s.frame_ids for s in samples if s.scene == scene]  # noqa
    assert ids(a, "a") == ids(b, "a") and ids(a, "b") == ids(b, "b")  # other scenes don't matter
    assert len({tuple(f) for f in ids(a, "a")}) == 5
    assert all(f == sorted(f) and len(set(f)) == 4 for f in ids(a, "a"))
    c, _ = sample_views(_groups({"a": 8}), 4, 5, "random", seed=4)
    assert ids(c, "a") != ids(a, "a")
    assert stable_seed(1, "x") == stable_seed(1, "x") != stable_seed(1, "y")
    few, _ = sample_views(_groups({"a": 4}), 3, 10, "random")
    assert len(few) == 4  # only C(4,3) distinct subsets exist


def test_too_few_frames_reported():
    with pytest.warns(UserWarning, match="1 scene"):
        samples, skipped = sample_views(_groups({"a": 2, "b": 5}), 3, 2, "stride")
    assert {s.scene for s in samples} == {"b"}
    assert skipped == [{"dataset": "d.s", "split": "train", "scene": "a", "frames": 2,
                        "needed": 3}]
    assert sample_key("ds.v2", "room.1/x", 12) == "ds_v2__room_1_x__s012"
    with pytest.raises(ValueError, match="sampling"):
        sample_views(_groups({"a": 5}), 3, 2, "every")


# ---------------------------------------------------------------------------------------------
# Writing and reading back
# ---------------------------------------------------------------------------------------------
def test_shards_hold_exact_arrays(manifest, tmp_path):
    params = _params()
    summary = build_cache(manifest, tmp_path / "cache", params, progress=False)
    assert summary["complete"] and summary["shards"] == {"train": 2, "val": 1}
    teacher = get_teacher(params.teacher)
    plan = plan_cache(manifest, params.cache, teacher)
    expected = {s.key: s for shards in plan.shards.values() for shard in shards for s in shard}
    decoded = {}
    for split in ("train", "val"):
        index = read_index(tmp_path / "cache" / split)
        assert index["teacher"]["fingerprint"] == teacher.fingerprint()
        assert index["num_samples"] == sum(s["samples"] for s in index["shards"])
        decoded.update({d["key"]: d for d in read_split(tmp_path / "cache" / split)})
        for shard in sorted((tmp_path / "cache" / split).glob("shard-*.tar")):
            with tarfile.open(shard) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for key in {n.split(".", 1)[0] for n in members}:
                batch, gt = load_sample(expected[key], (28, 28))
                out = teacher.predict(batch)
                t = np.load(io.BytesIO(members[f"{key}.teacher.npz"]), allow_pickle=False)
                assert t["xyz_global"].dtype == np.float16
                np.testing.assert_array_equal(t["xyz_global"], out.xyz_global.astype(np.float16))
                np.testing.assert_array_equal(t["xyz_local"], out.xyz_local.astype(np.float16))
                np.testing.assert_array_equal(t["conf_local"], out.conf_local.astype(np.float16))
                np.testing.assert_array_equal(rle_decode(t["mask_rle"], t["mask_shape"]),
                                              out.mask)
                imgs = np.load(io.BytesIO(members[f"{key}.images.npz"]), allow_pickle=False)
                np.testing.assert_array_equal(imgs["images"], batch.images)
                g = np.load(io.BytesIO(members[f"{key}.gt.npz"]), allow_pickle=False)
                np.testing.assert_array_equal(g["depth"], gt["depth"])
                np.testing.assert_array_equal(g["K"], gt["K"].astype(np.float32))
                d = decoded[key]  # through the reader: float16 values exactly, mask exactly
                np.testing.assert_array_equal(d["xyz_global"].numpy(),
                                              t["xyz_global"].astype(np.float32))
                np.testing.assert_array_equal(d["mask"].numpy(), out.mask)
                np.testing.assert_array_equal(
                    (d["images"].permute(0, 2, 3, 1).numpy() * 255).round(), batch.images)
                assert d["meta"]["frames"] == expected[key].frame_ids
    assert sorted(decoded) == sorted(expected)
    # a second build changes nothing; a fresh build is byte-identical
    assert build_cache(manifest, tmp_path / "cache", params, progress=False)["built"] == 0
    build_cache(manifest, tmp_path / "again", params, progress=False)
    for split in ("train", "val"):
        assert _tar_bytes(tmp_path / "cache" / split) == _tar_bytes(tmp_path / "again" / split)


def test_compression_changes_the_bytes_and_fingerprint_not_the_samples(manifest, tmp_path):
    teacher = get_teacher(Params().teacher)
    built, fingerprints = {}, {}
    for mode in ("deflate", "stored", "auto"):
        summary = build_cache(manifest, tmp_path / mode, _params(compression=mode),
                              progress=False)
        fingerprints[mode] = summary["fingerprint"]
        built[mode] = [d for split in ("train", "val") for d in read_split(tmp_path / mode / split)]
    assert len(set(fingerprints.values())) == 3
    sizes = {m: sum(p.stat().st_size for p in (tmp_path / m).rglob("*.tar")) for m in built}
    assert sizes["deflate"] < sizes["auto"] < sizes["stored"]
    for mode in ("stored", "auto"):
        for got, want in zip(built[mode], built["deflate"]):
            assert got["key"] == want["key"] and got["meta"] == want["meta"]
            assert all(got[k].equal(v) for k, v in want.items() if hasattr(v, "equal"))
    # deflate: the bytes of caches built before the setting existed, and their fingerprint
    cache = to_dict(_params(compression="deflate").cache)
    del cache["compression"]
    plan = plan_cache(manifest, _params(compression="deflate").cache, teacher)
    assert fingerprints["deflate"] == params_digest(
        {"format": FORMAT, "cache": cache, "teacher": teacher.fingerprint(),
         "manifest": plan.manifest_sha256})


def test_shard_max_bytes_limits_samples_per_shard(manifest, tmp_path):
    limit = 2 * sample_nbytes_bound(3, 28, 28) + 100
    params = _params(shard_max_samples=64, max_samples_per_scene=4, shard_max_bytes=limit)
    summary = build_cache(manifest, tmp_path / "c", params, progress=False)
    assert summary["samples_per_shard"] == 2 and summary["shards"]["train"] == 4
    for shard in (tmp_path / "c" / "train").glob("shard-*.tar"):
        assert shard.stat().st_size <= limit


def test_parts_and_finalize(manifest, tmp_path):
    params = _params(shard_max_samples=1)
    first = build_cache(manifest, tmp_path / "p", params, 0, 2, progress=False)
    assert not first["complete"] and not (tmp_path / "p" / "train").exists()
    second = build_cache(manifest, tmp_path / "p", params, 1, 2, progress=False)
    assert second["complete"] and first["built"] + second["built"] == 6
    build_cache(manifest, tmp_path / "whole", params, progress=False)
    for split in ("train", "val"):
        assert _tar_bytes(tmp_path / "p" / split) == _tar_bytes(tmp_path / "whole" / split)
    assert sorted(os.listdir(tmp_path)) == [".p.lock", ".whole.lock", "p", "whole"]
    with pytest.raises(ValueError, match="shard_index"):
        build_cache(manifest, tmp_path / "p", params, 2, 2, progress=False)


def test_concurrent_part_refused(manifest, tmp_path):
    params = _params()
    plan = plan_cache(manifest, params.cache, get_teacher(params.teacher))
    staging = tmp_path / f".c.build-{plan.fingerprint}"
    staging.mkdir(parents=True)
    with open(staging / "part-0-of-1.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another process"):
            build_cache(manifest, tmp_path / "c", params, progress=False)


def test_failed_rebuild_keeps_complete_cache(manifest, tmp_path):
    out = tmp_path / "cache"
    old_fingerprint = build_cache(manifest, out, _params(), progress=False)["fingerprint"]
    before = {s: (_tar_bytes(out / s), (out / s / "index.json").read_bytes())
              for s in ("train", "val")}
    records = read_manifest(manifest)
    broken = tmp_path / "broken" / "manifest.csv"
    broken.parent.mkdir()
    bad = broken.parent / "bad.png"
    bad.write_bytes(b"not a png")
    records[7].image = bad
    from distill3r.data.manifest import write_manifest
    write_manifest(records, broken)
    with pytest.raises(ValueError, match="bad.png"):
        build_cache(broken, out, _params(), progress=False)
    after = {s: (_tar_bytes(out / s), (out / s / "index.json").read_bytes())
             for s in ("train", "val")}
    assert after == before
    assert not list(tmp_path.glob(".cache.build-*/cache/*/.*.tmp-*"))
    # new params: rebuilt into staging and swapped in, never mixed with the old shards
    summary = build_cache(manifest, out, _params(seed=1), progress=False)
    for split in ("train", "val"):
        index = read_index(out / split)
        assert index["fingerprint"] == summary["fingerprint"] != old_fingerprint
        assert index["cache_params"]["seed"] == 1
        assert sorted(p.name for p in (out / split).glob("*.tar")) == \
            [s["name"] for s in index["shards"]]
    assert not list(tmp_path.glob(".cache.build-*")) and not list(tmp_path.glob(".cache.trash-*"))


@pytest.mark.slow
def test_sigkill_midway_then_resume(tmp_path):
    manifest = make_box_room_manifest(tmp_path / "raw", num_scenes=24, frames=5, height=24,
                                      width=24, val_scenes=4)
    params = tmp_path / "params.yaml"
    params.write_text("cache:\n  image_size: [14, 14]\n  views_per_sample: 3\n"
                      "  max_samples_per_scene: 4\n  shard_max_samples: 2\n")
    cmd = [sys.executable, str(REPO / "stages" / "cache.py"), "--params", str(params),
           "--manifest", str(manifest), "--no-progress"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".killed.build-*/cache/*/shard-*.tar")) and \
            time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "train" / "index.json").exists(), "the build finished before the kill"
    staging = next(tmp_path.glob(".killed.build-*"))
    stale = staging / "cache" / "train" / ".shard-000005.tar.tmp-999999.tar"
    stale.write_bytes(b"partial")  # as left by a killed writer
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True)
    from distill3r.config import load_params
    build_cache(manifest, tmp_path / "clean", load_params(params), progress=False)
    for split in ("train", "val"):
        assert _keys(out / split) == _keys(tmp_path / "clean" / split)
        assert len(set(_keys(out / split))) == read_index(out / split)["num_samples"]
        assert _tar_bytes(out / split) == _tar_bytes(tmp_path / "clean" / split)
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or ".build-" in p.name]
    assert leftovers == []
    assert sorted(os.listdir(out)) == ["train", "val"]
