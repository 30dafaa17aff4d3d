"""Caches, students and images from other people: no crash, no unbounded allocation, no silent
loss, one atomic swap. Every hostile input is built here (no committed binaries)."""

import importlib.util
import io
import json
import os
import pickle
import shutil
import signal
import struct
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from boxroom import make_box_room_manifest

import distill3r.atomic as atomic
from distill3r.cache.errors import CacheError
from distill3r.cache.reader import (check_same_build, read_index, read_split, shard_samples,
                                    split_shards)
from distill3r.cache.rle import rle_decode
from distill3r.cache.schema import decode_sample, npz_bytes, sample_digest
from distill3r.cache.swap import built_fingerprint
from distill3r.cache.writer import build_cache, finalize_cache, plan_cache
from distill3r.config import CacheParams, Params
from distill3r.data.io import read_image, write_image
from distill3r.models import build_student, load_student, save_student
from distill3r.teachers import get_teacher

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import cache_fuzz  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPE = (3, 28, 28)


def _params(**cache) -> Params:
    p = Params()
    p.cache = CacheParams(**{"image_size": [28, 28], "views_per_sample": 3,
                             "max_samples_per_scene": 2, "shard_max_samples": 2, **cache})
    return p


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_box_room_manifest(tmp_path_factory.mktemp("raw"), num_scenes=3, frames=5,
                                  height=32, width=40, val_scenes=1)


@pytest.fixture(scope="module")
def cache(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "cache"
    build_cache(manifest, out, _params(), progress=False)
    return out


@pytest.fixture
def split(cache, tmp_path):
    """A private copy of the val split (one shard of two samples)."""
    shutil.copytree(cache / "val", tmp_path / "val")
    return tmp_path / "val"


def _raw(cache) -> dict:
    return next(shard_samples(cache / "val" / "shard-000000.tar"))


def _signed(raw: dict, **members) -> dict:
    raw = dict(raw, **members)
    raw["sha256"] = sample_digest(raw).encode()
    return raw


def _teacher_with(raw: dict, **arrays) -> dict:
    with np.load(io.BytesIO(raw["teacher.npz"])) as z:
        t = {k: z[k] for k in z.files}
    t.update(arrays)
    return _signed(raw, **{"teacher.npz": npz_bytes(t)})


def _bounded(fn, limit_mb: float = 64):
    """``fn()`` must raise CacheError/ValueError while Python allocates < ``limit_mb``."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit_mb * 2**20, f"{peak / 2**20:.0f} MB allocated"
    return info.value


# ---------------------------------------------------------------------------------------------
# 1. RLE overflow (used to segfault)
# ---------------------------------------------------------------------------------------------
def test_rle_runs_that_wrap_int64_are_refused():
    runs = np.array([2**62, 2**62, 2**62, 2**62 + 24], np.int64)  # int64 sum wraps to 24
    with pytest.raises(CacheError, match="longer than the mask"):
        rle_decode(runs, [2, 3, 4])
    with pytest.raises(CacheError, match="runs for"):
        rle_decode(np.ones(30, np.int32), [2, 3, 4])


def test_wrapping_rle_in_a_sample_names_shard_sample_member(cache):
    raw = _raw(cache)
    bad = _teacher_with(raw, mask_rle=np.array([2**62] * 3 + [2**62 + 3 * 28 * 28], np.int64))
    err = _bounded(lambda: decode_sample(bad, SHAPE))
    assert isinstance(err, CacheError) and err.member == "teacher.npz" and \
        err.sample == raw["__key__"] and err.path.endswith("shard-000000.tar")


# ---------------------------------------------------------------------------------------------
# 2. Claimed sizes never drive allocations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("claim", [[2, 10**9], [10**12], [3, 28, 10**9]])
def test_huge_mask_shape_refused_before_decoding(cache, claim):
    bad = _teacher_with(_raw(cache), mask_shape=np.array(claim, np.int64))
    _bounded(lambda: decode_sample(bad))


def test_npy_header_claiming_terabytes_is_refused(cache):
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False,
                                                "shape": (2**20, 2**20, 8, 3)})  # 24 TiB
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as zf:
        zf.writestr("images.npy", head.getvalue() + bytes(64))
    bad = _signed(_raw(cache), **{"images.npz": npz.getvalue()})
    err = _bounded(lambda: decode_sample(bad))
    assert "member images.npz" in str(err) and "limit" in str(err)


def test_zip_bomb_images_refused_from_the_declared_size(cache):
    bad = _signed(_raw(cache), **{"images.npz": cache_fuzz.bomb(64)})  # inflates to 64 MB
    assert "member images.npz" in str(_bounded(lambda: decode_sample(bad, SHAPE), 16))
    assert "member images.npz" in str(_bounded(lambda: decode_sample(bad, None, 10**6), 16))


def test_gzip_compressed_shard_is_not_opened(split):
    import gzip
    shard = split / "shard-000000.tar"
    shard.write_bytes(gzip.compress(shard.read_bytes()))
    with pytest.raises(CacheError, match="shard-000000.tar: header at byte 0: .*checksum|ustar"):
        list(shard_samples(shard, 2, SHAPE))


def test_member_larger_than_the_split_allows_is_not_read(split, tmp_path):
    shard = split / "shard-000000.tar"
    samples = list(shard_samples(shard))
    samples[0] = _signed(samples[0], **{"meta.json": b" " * (3 << 20)})
    shard.write_bytes(cache_fuzz.tar_bytes(samples))
    with pytest.raises(CacheError, match=r"member .*meta\.json: claims \d+ bytes, above"):
        list(shard_samples(shard, 2, (1, 1, 1)))


def test_index_claiming_10_12_samples_refused(split):
    index = json.loads((split / "index.json").read_text())
    index["shards"][0]["samples"] = 10**12
    index["num_samples"] = 10**12
    (split / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError, match="cannot fit"):
        split_shards(split)


def _png_claiming(path: Path, width: int, height: int) -> None:
    import cv2
    ok, buf = cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))
    data = bytearray(buf.tobytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))


def test_image_pixel_ceiling_checked_from_the_header(tmp_path):
    big = tmp_path / "big.png"
    _png_claiming(big, 20000, 20000)
    err = _bounded(lambda: read_image(big), 16)
    assert "big.png" in str(err) and "400000000 pixels, above the limit" in str(err)
    small = tmp_path / "small.png"
    write_image(small, np.zeros((30, 40, 3), np.uint8))
    assert read_image(small).shape == (30, 40, 3)
    with pytest.raises(ValueError, match="above the limit of 1000"):
        read_image(small, max_pixels=1000)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_student(build_student("tiny"), tmp_path_factory.mktemp("model") / "student")


@pytest.mark.parametrize("key, value", [("enc_dim", 65536), ("max_views", 6_000_000),
                                        ("dpt_layer_dims", [96, 192, 384, 10**6]),
                                        ("dpt_image_full", 10**6)])
def test_model_config_bounds_checked_before_building(student_dir, tmp_path, key, value):
    folder = tmp_path / "student"
    shutil.copytree(student_dir, folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["config"][key] = value
    (folder / "config.json").write_text(json.dumps(meta))
    err = _bounded(lambda: load_student(folder), 16)
    assert "config.json" in str(err) and key in str(err)


def test_safetensors_shapes_checked_before_any_allocation(student_dir, tmp_path):
    folder = tmp_path / "student"
    shutil.copytree(student_dir, folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["config"].update(enc_dim=1024, enc_heads=16, enc_depth=24)  # ~1.2 GB if built
    (folder / "config.json").write_text(json.dumps(meta))
    err = _bounded(lambda: load_student(folder), 32)
    assert "model.safetensors: weights do not match the config" in str(err)
    assert "shape mismatches: " in str(err)


# ---------------------------------------------------------------------------------------------
# 3. Whatever fails underneath becomes the one error type
# ---------------------------------------------------------------------------------------------
def _zip_edit(data: bytes, offset_in_header: int, value: bytes, sig=b"PK\x01\x02") -> bytes:
    b = bytearray(data)
    at = b.index(sig) + offset_in_header
    b[at:at + len(value)] = value
    return bytes(b)


def test_low_level_failures_are_cache_errors(cache):
    raw = _raw(cache)
    member = raw["images.npz"]
    flipped = bytearray(member)
    flipped[len(member) // 3] ^= 0x40  # inside the deflate stream: zlib.error or a bad CRC
    nested = b"[" * 100_000 + b"]" * 100_000
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False,
                                                "shape": (1,)})
    mangled = head.getvalue().replace(b"(1,)", b"(1,(")
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as zf:
        zf.writestr("images.npy", mangled)
    cases = {
        "deflate": {"images.npz": bytes(flipped)},
        "method": {"images.npz": _zip_edit(member, 10, struct.pack("<H", 99))},
        "encrypted": {"images.npz": _zip_edit(member, 8, struct.pack("<H", 1))},
        "npy header": {"images.npz": npz.getvalue()},
        "nested meta": {"meta.json": nested},
        "not utf8": {"meta.json": b"\xff\xfe"},
    }
    for name, members in cases.items():
        with pytest.raises(CacheError) as info:
            decode_sample(_signed(raw, **members), SHAPE)
        assert raw["__key__"] in str(info.value) and info.value.member in members, name


# ---------------------------------------------------------------------------------------------
# 4. No silent loss on the evaluation path
# ---------------------------------------------------------------------------------------------
def _set_bytes(split: Path) -> None:
    """A careless copy: index.json's size updated to the shard's, counts left alone."""
    index = json.loads((split / "index.json").read_text())
    index["shards"][0]["bytes"] = (split / "shard-000000.tar").stat().st_size
    (split / "index.json").write_text(json.dumps(index))


def test_val_shard_cut_at_a_sample_boundary_fails_evaluation(split):
    from distill3r.evaluation.runner import val_batches

    shard = split / "shard-000000.tar"
    first = list(shard_samples(shard))[:1]
    shard.write_bytes(cache_fuzz.tar_bytes(first))  # a complete tar holding one sample
    _set_bytes(split)
    with pytest.raises(CacheError, match="holds 1 samples but index.json lists 2"):
        list(val_batches(split, 4, None))


def test_zero_blocks_inside_a_shard_are_an_error(split):
    shard = split / "shard-000000.tar"
    data = shard.read_bytes()
    second = 512 + -(-int(data[124:136].rstrip(b"\0 "), 8) // 512) * 512  # 2nd member's header
    shard.write_bytes(data[:second] + bytes(1024) + data[second:])
    _set_bytes(split)
    with pytest.raises(CacheError, match="data after the end-of-archive"):
        list(read_split(split))


# ---------------------------------------------------------------------------------------------
# 5. index.json is validated as a schema
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda i: [i], "must hold a JSON object"),
    (lambda i: {**i, "shards": ["shard-000000.tar"]}, r"shards\[0\] must be an object"),
    (lambda i: {**i, "shards": [{"samples": 2, "bytes": 9}]}, "not a plain shard file name"),
    (lambda i: {**i, "shards": [{**i["shards"][0], "samples": -1}], "num_samples": -1},
     "integers >= 0"),
    (lambda i: {**i, "shards": [{**i["shards"][0], "name": "../train/shard-000000.tar"}]},
     "not a plain shard file name"),
    (lambda i: {**i, "shards": [{**i["shards"][0], "name": "/etc/shard.tar"}]},
     "not a plain shard file name"),
    (lambda i: {**i, "num_samples": 5}, "num_samples 5"),
    (lambda i: {**i, "image_size": "28"}, "image_size"),
    (lambda i: {**i, "views_per_sample": 10**6, "image_size": [1000, 1000]}, "ceiling"),
])
def test_bad_index_refused_naming_the_file(split, edit, message):
    index = json.loads((split / "index.json").read_text())
    (split / "index.json").write_text(json.dumps(edit(index)))
    with pytest.raises(CacheError, match=rf"val/index.json: .*{message}"):
        read_index(split)


def test_reduced_count_in_the_index_is_an_error(split):
    index = json.loads((split / "index.json").read_text())
    index["shards"][0]["samples"] = index["num_samples"] = 1
    (split / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError, match="more than the 1 samples index.json lists"):
        list(read_split(split))


# ---------------------------------------------------------------------------------------------
# 6. The swap of both splits is atomic; concurrent builds are refused
# ---------------------------------------------------------------------------------------------
def _killed_at(k: int, after: bool, fn) -> bool:
    """Run ``fn`` in a forked child killed (SIGKILL) just before (or after) its ``k``-th
    rename (``os.rename``, ``os.replace`` or a directory exchange); True if it was killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child
        try:
            calls = [0]

            def wrap(orig):
                def renamed(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == k and not after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    result = orig(*args, **kwargs)
                    if calls[0] == k and after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return result
                return renamed

            os.rename, os.replace = wrap(os.rename), wrap(os.replace)
            atomic._exchange = wrap(atomic._exchange)
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def _state(out: Path) -> str:
    fp = built_fingerprint(out)
    check_same_build(read_index(out / "train"), read_index(out / "val"), out)
    for split in ("train", "val"):
        assert len(list(read_split(out / split, decode=False))) == \
            read_index(out / split)["num_samples"]
    return fp


def test_kill_at_every_rename_of_the_swap_leaves_old_or_new(manifest, tmp_path):
    base = tmp_path / "base"
    old = build_cache(manifest, base / "cache", _params(), progress=False)["fingerprint"]
    new_params = _params(seed=3)
    staged = build_cache(manifest, base / "cache", new_params, progress=False, finalize=False)
    new = staged["fingerprint"]
    assert built_fingerprint(base / "cache") == old != new
    plan = plan_cache(manifest, new_params.cache, get_teacher(new_params.teacher))
    seen, points = set(), 0
    for after in (False, True):
        k = 1
        while True:
            trial = tmp_path / f"t{int(after)}-{k}"
            shutil.copytree(base, trial)
            out = trial / "cache"
            killed = _killed_at(k, after, lambda: finalize_cache(plan, out))
            state = _state(out)
            assert state in (old, new), (k, after)
            seen.add(state)
            assert build_cache(manifest, out, new_params, progress=False)["complete"]
            assert _state(out) == new
            assert sorted(os.listdir(trial)) == [".cache.lock", "cache"]
            if not killed:
                break
            points, k = points + 1, k + 1
    assert seen == {old, new} and points >= 8  # index x2, journal, exchange: before and after


def test_second_concurrent_build_exits_with_a_clear_message(manifest, tmp_path):
    from distill3r.cache.swap import build_lock

    out = tmp_path / "cache"
    with build_lock(out):  # a first build holding the lock (another process's flock alike)
        with pytest.raises(ValueError, match=r"\.cache\.lock: another cache build into .* is "
                                             "running"):
            build_cache(manifest, out, _params(seed=5), progress=False)
        with pytest.raises(ValueError, match="another cache build"):
            build_cache(manifest, out, _params(), 0, 2, progress=False)
    assert not out.exists()
    first = build_cache(manifest, out, _params(), progress=False)["fingerprint"]
    second = build_cache(manifest, out, _params(seed=5), progress=False)["fingerprint"]
    assert _state(out) == second != first


def test_stage_reports_lock_without_traceback(manifest, tmp_path, capsys):
    from distill3r.cache.swap import build_lock

    spec = importlib.util.spec_from_file_location("cache_stage", REPO / "stages" / "cache.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    params = tmp_path / "params.yaml"
    params.write_text("cache:\n  image_size: [28, 28]\n  views_per_sample: 3\n")
    with build_lock(tmp_path / "cache"):
        rc = stage.main(["--params", str(params), "--manifest", str(manifest), "--out",
                         str(tmp_path / "cache"), "--no-progress"])
    assert rc == 1 and "cache: error: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 7. Model folders
# ---------------------------------------------------------------------------------------------
def test_kill_at_every_rename_of_save_student_leaves_a_loadable_student(tmp_path):
    old_model, new_model = build_student("tiny"), build_student("tiny")
    with torch.no_grad():
        next(new_model.parameters()).add_(1.0)
    folder = save_student(old_model, tmp_path / "student")
    fingerprints = {json.loads((save_student(m, tmp_path / f"ref{i}") / "config.json")
                               .read_text())["sha256"] for i, m in enumerate((old_model,
                                                                            new_model))}
    seen = set()
    for after in (False, True):
        for k in range(1, 10):
            killed = _killed_at(k, after, lambda: save_student(new_model, folder))
            load_student(folder)  # never half a folder
            seen.add(json.loads((folder / "config.json").read_text())["sha256"])
            save_student(old_model, folder)
            if not killed:
                break
    assert seen == fingerprints
    assert sorted(os.listdir(tmp_path)) == ["ref0", "ref1", "student"]


def test_weights_fingerprint_is_required(student_dir, tmp_path):
    folder = tmp_path / "student"
    shutil.copytree(student_dir, folder)
    meta = json.loads((folder / "config.json").read_text())
    del meta["sha256"]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no weights fingerprint"):
        load_student(folder)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_bad_last_ckpt_is_a_clean_error(tmp_path):
    from distill3r.training.callbacks import AtomicCheckpointIO

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "x": _Payload()}, ckpt)
    io_ = AtomicCheckpointIO()
    with pytest.raises(ValueError,
                       match=r"last.ckpt: refused: .*unsupported GLOBAL posix.system") as info:
        io_.load_checkpoint(ckpt)
    assert "weights_only=False" not in str(info.value)
    ckpt.write_bytes(pickle.dumps({"a": 1}, protocol=2)[:5])
    with pytest.raises(ValueError, match="last.ckpt: refused"):
        io_.load_checkpoint(ckpt)


# ---------------------------------------------------------------------------------------------
# 8. meta.json is covered by the checksum; infer goes on after a failing scene
# ---------------------------------------------------------------------------------------------
def test_meta_json_flip_is_detected(split):
    shard = split / "shard-000000.tar"
    samples = list(shard_samples(shard))
    samples[1]["meta.json"] = samples[1]["meta.json"].replace(b'"val"', b'"vam"')
    shard.write_bytes(cache_fuzz.tar_bytes(samples))
    _set_bytes(split)
    with pytest.raises(CacheError, match=rf"sample {samples[1]['__key__']}: member sha256: "
                                         "checksum mismatch"):
        list(read_split(split))


def test_webdataset_still_reads_the_shards(cache):
    import webdataset as wds

    shard = cache / "val" / "shard-000000.tar"
    keys = [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False)]
    assert keys == [s["__key__"] for s in shard_samples(shard)]


def test_infer_reports_a_failing_scene_and_runs_the_others(student_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for scene in ("a_good", "b_bad", "c_good"):
        for i in range(2):
            write_image(tmp_path / "in" / scene / f"{i}.png",
                        rng.integers(0, 255, (28, 42, 3), dtype=np.uint8))
    (tmp_path / "in" / "b_bad" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    spec = importlib.util.spec_from_file_location("infer_stage", REPO / "stages" / "infer.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    rc = stage.main([str(tmp_path / "in"), "--checkpoint", str(student_dir), "--output-dir",
                     str(tmp_path / "out"), "--size", "28", "--device", "cpu",
                     "--params", str(REPO / "params.yaml")])
    err = capsys.readouterr().err
    assert rc == 1 and "scene b_bad: " in err and "1 of 3 scene(s) failed: b_bad" in err
    assert (tmp_path / "out" / "a_good_student.ply").is_file()
    assert (tmp_path / "out" / "c_good_student.ply").is_file()
