"""The npz encodings of a cache sample (``cache.compression``): exact round trips, numpy
compatibility, caches written before the setting existed, hostile stored entries."""

import io
import struct
import zipfile

import numpy as np
import pytest

from distill3r.cache.errors import CacheError
from distill3r.cache.schema import decode_sample, encode_sample, npz_bytes, sample_digest
from distill3r.teachers.base import TeacherOutput

SHAPE = (3, 14, 28)
MODES = ("deflate", "stored", "auto")


def _inputs():
    """A teacher output with smooth local maps, noisy global maps (deflate cannot halve
    them), constant confidences, a mask, images and ground truth."""
    n, h, w = SHAPE
    rng = np.random.default_rng(0)
    v, u = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    plane = np.stack([u, v, 2 + 0.1 * u], -1).astype(np.float32)
    out = TeacherOutput(rng.normal(0, 3, (n, h, w, 3)).astype(np.float32),
                        np.stack([plane * (1 + i) for i in range(n)]),
                        np.full((n, h, w), 2.0, np.float32),
                        rng.uniform(0.5, 70000, (n, h, w)).astype(np.float32),
                        rng.random((n, h, w)) > 0.2)
    images = rng.integers(0, 256, (n, h, w, 3), np.uint8)
    gt = {"depth": np.repeat(plane[None, ..., 2], n, 0), "K": np.tile(np.eye(3), (n, 1, 1)),
          "c2w": np.tile(np.eye(4), (n, 1, 1))}
    return out, images, gt


def _sample(compression: str) -> dict:
    out, images, gt = _inputs()
    raw = encode_sample("d__s__s000", out, images, gt, {"dataset": "d"}, 60000.0, compression)
    return {**raw, "__url__": "shard-000000.tar"}


def _methods(member: bytes) -> dict[str, int]:
    with zipfile.ZipFile(io.BytesIO(member)) as zf:
        return {i.filename[:-4]: i.compress_type for i in zf.infolist()}


def _format2_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz member as ``distill3r-cache/2`` caches were written before ``cache.compression``
    existed: every entry deflated, zip64 headers, timestamps of 1980-01-01."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _members(raw: dict, member: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(raw[member]), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_every_compression_decodes_to_the_same_exact_values():
    out, images, gt = _inputs()
    decoded = {mode: decode_sample(_sample(mode), SHAPE) for mode in MODES}
    for mode, d in decoded.items():
        np.testing.assert_array_equal(d["xyz_global"].numpy(),
                                      out.xyz_global.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(d["xyz_local"].numpy(),
                                      out.xyz_local.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(
            d["conf_local"].numpy(),
            np.clip(out.conf_local, 1, 60000).astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(d["mask"].numpy(), out.mask)
        np.testing.assert_array_equal(d["images"].numpy(),
                                      images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
        np.testing.assert_array_equal(d["depth"].numpy(), gt["depth"])
        for name, t in d.items():
            if hasattr(t, "dtype") and mode != "deflate":
                assert t.dtype == decoded["deflate"][name].dtype
                np.testing.assert_array_equal(t.numpy(), decoded["deflate"][name].numpy())
    raw = _sample("stored")
    for name in ("xyz_global", "depth", "K"):  # tensors own their memory: the bytes unchanged
        decode_sample(raw, SHAPE)[name].add_(1)
        assert decode_sample(raw, SHAPE)[name].equal(decoded["deflate"][name])


def test_members_are_plain_npz_for_numpy_in_every_mode():
    ref = _sample("deflate")
    for mode in MODES:
        raw = _sample(mode)
        for member in ("teacher.npz", "images.npz", "gt.npz"):
            got, want = _members(raw, member), _members(ref, member)
            assert got.keys() == want.keys()
            for k in got:
                np.testing.assert_array_equal(got[k], want[k])


def test_auto_deflates_only_entries_it_halves():
    stored, deflated = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
    assert set(_methods(_sample("deflate")["teacher.npz"]).values()) == {deflated}
    assert set(_methods(_sample("stored")["teacher.npz"]).values()) == {stored}
    auto = _methods(_sample("auto")["teacher.npz"])
    assert auto["xyz_global"] == stored and auto["conf_local"] == stored  # noise
    assert auto["conf_global"] == deflated and auto["mask_rle"] == deflated  # constant, small
    sizes = {mode: sum(len(v) for k, v in _sample(mode).items() if k.endswith(".npz"))
             for mode in MODES}
    assert sizes["deflate"] < sizes["auto"] < sizes["stored"]


def test_caches_from_before_the_setting_keep_their_bytes_and_read():
    out, images, _ = _inputs()
    arrays = {"images": images, "depth": out.conf_local}
    assert npz_bytes(arrays, "deflate") == _format2_npz(arrays)  # same bytes, same fingerprint
    raw = _sample("deflate")
    for member in ("teacher.npz", "images.npz", "gt.npz"):  # numpy's own writers read too
        arrays = _members(raw, member)
        assert raw[member] == _format2_npz(arrays)
        for write in (np.savez, np.savez_compressed):
            buf = io.BytesIO()
            write(buf, **arrays)
            other = dict(raw, **{member: buf.getvalue()})
            other["sha256"] = sample_digest(other).encode()
            got = decode_sample(other, SHAPE)
            assert all(got[k].equal(v) for k, v in decode_sample(raw, SHAPE).items()
                       if hasattr(v, "equal"))


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="cache.compression"):
        _sample("zstd")


def _edited(raw: dict, member: str, data: bytes) -> dict:
    out = dict(raw, **{member: data})
    out["sha256"] = sample_digest(out).encode()
    return out


def _set(data: bytes, at: int, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<I", b, at, value)
    return bytes(b)


def test_hostile_stored_and_deflated_entries_are_named_cache_errors():
    raw = _sample("stored")
    stored, deflated = raw["images.npz"], _sample("deflate")["images.npz"]
    name_len, extra_len = struct.unpack_from("<2H", stored, 26)
    flipped = bytearray(stored)
    flipped[30 + name_len + extra_len + 200] ^= 1  # a data byte of the stored entry
    # central directory fields (APPNOTE 4.3.12): CRC at 16, sizes at 20 and 24, offset at 42
    c, d = stored.index(b"PK\x01\x02"), deflated.index(b"PK\x01\x02")
    csize, usize = struct.unpack_from("<2I", deflated, d + 20)
    cases = {
        "CRC-32 mismatch": bytes(flipped),
        "names another file": stored.replace(b"images.npy", b"imagex.npy", 1),
        "no local zip header": _set(stored, c + 42, 7),
        "is stored with": _set(stored, c + 24, len(stored) // 2),
        "the npz ends": _set(stored, c + 20, len(stored) * 2),
        "inflates to more than": _set(deflated, d + 24, usize - 1),
        "(unterminated)": _set(deflated, d + 20, csize // 2),
    }
    for problem, data in cases.items():
        with pytest.raises(CacheError) as info:
            decode_sample(_edited(raw, "images.npz", data), SHAPE)
        assert info.value.member == "images.npz" and "d__s__s000" in str(info.value), problem
        assert problem in str(info.value), (problem, str(info.value))
