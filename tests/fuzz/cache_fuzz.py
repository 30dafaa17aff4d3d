"""Fuzz the cache decoders: the RLE decoder, the sample decoder and the shard reader.

    python tests/fuzz/cache_fuzz.py --inputs 10000 --mem-mb 5120 [--seed 0] [--targets ...]

Each target runs in a child process under an address-space limit (``RLIMIT_AS``, as ``ulimit
-v``) and a per-input time limit; the parent restarts a child that dies (a crash: a signal, an
uncaught exception type, a MemoryError) or stops reporting (a hang), after the input that did
it. Every input must either decode to exactly what its bytes say (the original sample when the
mutation left the sample's bytes unchanged) or raise :class:`CacheError` naming the file (and,
for a sample, its key). Anything else is counted: ``crashes``, ``hangs``, ``silent`` (a drop or
change without an error), ``unnamed`` (a ``CacheError`` without the file). The inputs are a
pure function of ``(seed, target, index)``; the valid samples are written with every
``cache.compression`` (deflated, stored and mixed npz entries). ``run_target`` is the in-process loop that the
quick seeded test (``tests/test_fuzz_quick.py``) calls.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from distill3r.cache.errors import CacheError
from distill3r.cache.reader import shard_samples
from distill3r.cache.rle import rle_decode, rle_encode
from distill3r.cache.schema import decode_sample, encode_sample, npz_bytes, sample_digest
from distill3r.teachers.base import TeacherOutput

SHAPE = (2, 8, 12)  # views, H, W of the fuzzed samples
TARGETS = ("rle", "sample", "shard")
COMPRESSIONS = ("deflate", "stored", "auto")  # cache.compression of the valid samples


class Hang(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Valid inputs
# ---------------------------------------------------------------------------------------------
def make_sample(rng: np.random.Generator, key: str, url: str,
                compression: str = "deflate") -> dict:
    n, h, w = SHAPE
    xyz = rng.normal(size=(n, h, w, 3)).astype(np.float32)
    out = TeacherOutput(xyz, xyz * 0.5, rng.uniform(1, 30, (n, h, w)).astype(np.float32),
                        rng.uniform(1, 30, (n, h, w)).astype(np.float32),
                        rng.random((n, h, w)) > 0.3)
    gt = {"depth": rng.uniform(0, 5, (n, h, w)), "K": np.tile(np.eye(3), (n, 1, 1)),
          "c2w": np.tile(np.eye(4), (n, 1, 1))}
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    raw = encode_sample(key, out, images, gt, {"dataset": "fuzz", "scene": key},
                        compression=compression)
    raw["__url__"] = url
    return raw


def tar_bytes(samples: list[dict]) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as tar:
        for s in samples:
            tar.write({k: v for k, v in s.items() if k != "__url__"})
    return buf.getvalue()


def same(a, b) -> bool:
    """Exact equality of decoded samples (tensors, arrays, dicts, lists)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    if hasattr(a, "numpy"):
        a, b = a.numpy(), b.numpy() if hasattr(b, "numpy") else b
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype and \
            np.array_equal(a, b, equal_nan=True)
    return a == b


def reference_decode(raw: dict) -> dict:
    """What a sample's bytes say, read with numpy's own loader (only called on samples our
    decoder accepted, so every size is already known to be sane)."""
    import torch

    def load(member):
        with np.load(io.BytesIO(raw[member]), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    t, images = load("teacher.npz"), load("images.npz")["images"]
    out = {"key": raw["__key__"],
           "images": torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)}
    for name in ("xyz_global", "xyz_local", "conf_global", "conf_local"):
        out[name] = torch.from_numpy(t[name].astype(np.float32))
    runs = t["mask_rle"].astype(np.int64)
    size = int(np.prod(t["mask_shape"]))
    which = np.searchsorted(np.cumsum(runs), np.arange(size), side="right")
    out["mask"] = torch.from_numpy((which % 2 == 1).reshape(tuple(t["mask_shape"])))
    if "gt.npz" in raw:
        out.update({k: torch.from_numpy(v) for k, v in load("gt.npz").items()})
    out["meta"] = json.loads(raw["meta.json"])
    return out


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------
def flip(data: bytes, rng, count: int | None = None) -> bytes:
    b = bytearray(data)
    for _ in range(count or int(rng.integers(1, 9))):
        if b:
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
    return bytes(b)


def _rezip(data: bytes, edit) -> bytes:
    """The npz with each entry's npy bytes passed through ``edit(name, npy) -> npy``."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, edit(info.filename, src.read(info)))
    return buf.getvalue()


def npy_header_edit(data: bytes, rng) -> bytes:
    target = None

    def edit(name, npy):
        nonlocal target
        if target is None or rng.random() < 0.3:
            target = name
            end = npy.index(b"\n") + 1
            head = npy[10:end].decode("latin1")
            choice = int(rng.integers(7))
            if choice == 0:
                dims = ", ".join(str(int(x)) for x in
                                 rng.integers(-2, 2**62, int(rng.integers(1, 5))))
                head = head[:head.index("'shape'")] + f"'shape': ({dims},), }}"
            elif choice == 1:
                descr = str(rng.choice(["|O", "<f8", ">f2", "<i8", "V8"]))
                head = head.replace(head[head.index("'descr'"):].split(",")[0],
                                    f"'descr': '{descr}'")
            elif choice == 2:
                head = head.replace("False", "True")
            elif choice == 3:
                head = head[: int(rng.integers(len(head)))] + "(" * int(rng.integers(1, 60))
            elif choice == 4:
                head = head.replace("{", "{'x': " + "[" * 2000 + "]" * 2000 + ", ")
            elif choice == 5:
                head = head[: int(rng.integers(len(head)))] + "'\"\\"
            else:
                npy = npy[:int(rng.integers(10, len(npy)))]
                return npy
            body = head.encode("latin1")
            return npy[:8] + len(body).to_bytes(2, "little") + body + npy[end:]
        return npy

    return _rezip(data, edit)


def zip_field_edit(data: bytes, rng) -> bytes:
    """Overwrite a field of a local header or the central directory with a hostile value."""
    b = bytearray(data)
    sigs = {b"PK\x03\x04": {6: 2, 8: 2, 14: 4, 18: 4, 22: 4, 26: 2},
            b"PK\x01\x02": {8: 2, 10: 2, 16: 4, 20: 4, 24: 4, 28: 2, 30: 2}}
    places = [(i, sig) for sig in sigs for i in range(len(b)) if b[i:i + 4] == sig]
    if not places:
        return flip(data, rng)
    pos, sig = places[int(rng.integers(len(places)))]
    off, size = list(sigs[sig].items())[int(rng.integers(len(sigs[sig])))]
    value = int(rng.choice([0, 1, 99, 0xFFFF, 0xFFFFFFFF, int(rng.integers(1 << (8 * size)))]))
    b[pos + off:pos + off + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    return bytes(b)


_BOMB: dict[int, bytes] = {}


def bomb(megabytes: int) -> bytes:
    """A valid npz whose ``images`` entry inflates to ``megabytes`` MB of zeros (built once,
    streamed: never held uncompressed)."""
    if megabytes not in _BOMB:
        n = (megabytes << 20) // 3 * 3
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            with zf.open("images.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "|u1", "fortran_order": False, "shape": (1, n // 3, 1, 3)})
                zero = bytes(1 << 20)
                for _ in range(n >> 20):
                    f.write(zero)
                f.write(bytes(n % (1 << 20)))
        _BOMB[megabytes] = buf.getvalue()
    return _BOMB[megabytes]


def mutate_sample(base: dict, rng, bomb_mb: int) -> tuple[dict, bool]:
    """``(raw, signed)``: a mutated copy; ``signed`` if its checksum was recomputed (a hostile
    writer), so the mutation reaches the member decoders."""
    raw = dict(base)
    members = [k for k in raw if not k.startswith("__") and k != "sha256"]
    member = members[int(rng.integers(len(members)))]
    choice = int(rng.integers(12))
    npz = member.endswith(".npz")
    if choice == 0:
        raw[member] = flip(raw[member], rng)
        return raw, False
    if choice == 1 or (choice in (3, 4) and not npz):
        raw[member] = flip(raw[member], rng)
    elif choice == 2:
        cut = int(rng.integers(len(raw[member]) + 1))
        raw[member] = raw[member][:cut] + (flip(raw[member][cut:], rng) if rng.random() < .5
                                           else b"")
    elif choice == 3:
        raw[member] = npy_header_edit(raw[member], rng)
    elif choice == 4:
        raw[member] = zip_field_edit(raw[member], rng)
    elif choice == 5:
        raw["images.npz"] = bomb(bomb_mb)
    elif choice == 6:
        with np.load(io.BytesIO(raw["teacher.npz"])) as z:
            arrays = {k: z[k] for k in z.files}
        huge = [2**62, 2**62, 2**62, 2**62 + int(np.prod(SHAPE))]
        claims = [huge, [2, 10**9], [10**12], [-1, 4], [2**31, 2**31], [2, 8, 12]]
        arrays[str(rng.choice(["mask_rle", "mask_shape"]))] = np.array(
            claims[int(rng.integers(len(claims)))], np.int64)
        raw["teacher.npz"] = npz_bytes(arrays)
    elif choice == 7:
        metas = [b"[" * 100_000 + b"]" * 100_000, b"[1]", b"\xff\xfe",
                 b'{"a": ' * 5000 + b"1" + b"}" * 5000, b"{}", b" " * (2 << 20)]
        raw["meta.json"] = metas[int(rng.integers(len(metas)))]
    elif choice == 8:
        del raw[member]
    elif choice == 9:
        raw["extra.npz"] = raw[member]
    elif choice == 10:
        raw[member] = zlib.compress(raw[member]) if rng.random() < .5 else b""
    else:
        other = members[int(rng.integers(len(members)))]
        raw[member], raw[other] = raw[other], raw[member]
    raw["sha256"] = sample_digest(raw).encode()
    return raw, True


def mutate_shard(data: bytes, rng) -> bytes:
    blocks = len(data) // 512
    choice = int(rng.integers(10))
    at = 512 * int(rng.integers(blocks))
    if choice == 0:
        return flip(data, rng)
    if choice == 1:
        return data[:int(rng.integers(len(data)))]
    if choice == 2:
        return data[:at]  # cut at a block (often a member) boundary
    if choice == 3:
        return data[:at] + bytes(512 * int(rng.integers(1, 4))) + data[at:]
    if choice == 4:
        return data[:at] + data[at + 512:]
    if choice == 5:
        return data[:at] + data[at:at + 512] + data[at:]
    if choice == 6:
        import gzip
        return gzip.compress(data)
    if choice == 7:
        return data + (bytes(1024) if rng.random() < .5 else flip(bytes(1024), rng, 1))
    if choice == 8:  # a header's size field
        starts = [i for i in range(0, len(data), 512) if data[i + 257:i + 262] == b"ustar"]
        h = starts[int(rng.integers(len(starts)))]
        size = f"{int(rng.choice([0, 1, 8**11 - 1, int(rng.integers(1 << 30))])):011o}\0"
        return data[:h + 124] + size.encode() + data[h + 136:]
    b = bytearray(data)  # swap two data blocks
    j = 512 * int(rng.integers(blocks))
    b[at:at + 512], b[j:j + 512] = data[j:j + 512], data[at:at + 512]
    return bytes(b)


# ---------------------------------------------------------------------------------------------
# Targets: one input -> outcome ("ok", "error", "silent", "unnamed")
# ---------------------------------------------------------------------------------------------
def rle_input(rng) -> tuple[np.ndarray, list]:
    choice = int(rng.integers(5))
    shape = [int(s) for s in rng.integers(1, 6, int(rng.integers(1, 4)))]
    runs = rle_encode(rng.random(shape) > rng.random())
    if choice == 0:
        return runs, shape
    if choice == 1:
        k = int(rng.integers(1, 6))
        return np.array([2**62] * k + [int(np.prod(shape))], np.int64), shape
    if choice == 2:
        return rng.integers(-2**63, 2**63 - 1, int(rng.integers(0, 8)), dtype=np.int64), \
            [int(s) for s in rng.integers(-3, 2**40, int(rng.integers(0, 4)))]
    if choice == 3:
        runs = runs.astype(rng.choice([np.int8, np.int64, np.uint64, np.float32]))
    else:
        runs = runs.copy()
        if runs.size:
            runs[int(rng.integers(runs.size))] += int(rng.integers(-3, 4))
        shape = shape if rng.random() < .7 else [int(np.prod(shape)) + 1]
    return runs, shape


def run_rle(rng, _ctx) -> str:
    runs, shape = rle_input(rng)
    try:
        mask = rle_decode(runs, shape)
    except CacheError:
        return "error"
    size = int(np.prod(shape))
    which = np.searchsorted(np.cumsum(runs.astype(np.int64)), np.arange(size), side="right")
    ok = mask.shape == tuple(shape) and np.array_equal(mask.reshape(-1), which % 2 == 1)
    return "ok" if ok else "silent"


def run_sample(rng, ctx) -> str:
    which = int(rng.integers(len(ctx["bases"])))
    raw, signed = mutate_sample(ctx["bases"][which], rng, ctx["bomb_mb"])
    shape = SHAPE if rng.random() < 0.5 else None
    try:
        got = decode_sample(raw, shape)
    except CacheError as exc:
        return "error" if raw["__url__"] in str(exc) and raw["__key__"] in str(exc) \
            else "unnamed"
    want = reference_decode(raw) if signed else ctx["decoded"][which]
    return "ok" if same(got, want) else "silent"


def run_shard(rng, ctx) -> str:
    path = ctx["path"]
    path.write_bytes(mutate_shard(ctx["shard"], rng))
    try:
        got = [decode_sample(r, SHAPE) for r in shard_samples(path, len(ctx["decoded"]), SHAPE)]
    except CacheError as exc:
        return "error" if str(path) in str(exc) else "unnamed"
    return "ok" if same(got, ctx["decoded"]) else "silent"


def context(target: str, workdir: Path, bomb_mb: int) -> dict:
    rng = np.random.default_rng(12345)
    if target == "rle":
        return {}
    if target == "sample":
        bases = [make_sample(rng, "fuzz__scene__s000", str(workdir / "shard-000000.tar"), c)
                 for c in COMPRESSIONS]
        return {"bases": bases, "decoded": [decode_sample(b) for b in bases],
                "bomb_mb": bomb_mb}
    path = workdir / "shard-000000.tar"
    samples = [make_sample(rng, f"fuzz__scene__s{i:03d}", str(path), c)
               for i, c in enumerate(COMPRESSIONS)]
    return {"shard": tar_bytes(samples), "path": path,
            "decoded": [decode_sample(s) for s in samples]}


RUNNERS = {"rle": run_rle, "sample": run_sample, "shard": run_shard}


def run_target(target: str, start: int, count: int, seed: int, workdir: Path,
               timeout_s: float = 10.0, bomb_mb: int = 64, report=None) -> dict[str, int]:
    """Run inputs ``start .. start + count - 1`` of ``target`` in this process; counts of
    outcomes (an exception other than ``CacheError`` propagates: a crash)."""
    ctx = context(target, workdir, bomb_mb)
    counts: dict[str, int] = {}

    def on_alarm(*_):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for i in range(start, start + count):
            if report:
                report(f"start {i}")
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                outcome = RUNNERS[target](np.random.default_rng([seed, TARGETS.index(target), i]),
                                          ctx)
            except Hang:
                outcome = "hang"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts[outcome] = counts.get(outcome, 0) + 1
            if report:
                report(f"done {i} {outcome}")
    finally:
        signal.signal(signal.SIGALRM, previous)
    return counts


# ---------------------------------------------------------------------------------------------
# Command line: children under a memory limit, restarted after crashes and hangs
# ---------------------------------------------------------------------------------------------
def child(args) -> int:
    limit = args.mem_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with tempfile.TemporaryDirectory() as tmp:
        def report(line):
            print(line, flush=True)
        try:
            run_target(args.child, args.start, args.inputs, args.seed, Path(tmp),
                       args.timeout, args.bomb_mb, report)
        except BaseException as exc:  # noqa: BLE001 -- the parent counts it as a crash
            print(f"crash {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            return 3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak_kb {peak}", flush=True)
    return 0


def parent(args) -> int:
    summary = {}
    for target in args.targets:
        stats = {"inputs": 0, "ok": 0, "error": 0, "silent": 0, "unnamed": 0, "hangs": 0,
                 "crashes": 0, "peak_rss_mb": 0.0, "examples": []}
        start, end, t0 = 0, args.inputs, time.time()
        while start < end:
            cmd = [sys.executable, __file__, "--child", target, "--start", str(start),
                   "--inputs", str(end - start), "--seed", str(args.seed), "--mem-mb",
                   str(args.mem_mb), "--timeout", str(args.timeout), "--bomb-mb",
                   str(args.bomb_mb)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            current, last = None, time.time()
            for line in proc.stdout:
                kind, _, rest = line.strip().partition(" ")
                if kind == "start":
                    current = int(rest)
                elif kind == "done":
                    i, outcome = rest.split()
                    stats["inputs"] += 1
                    key = {"hang": "hangs"}.get(outcome, outcome)
                    stats[key] += 1
                    if key in ("silent", "unnamed", "hangs") and len(stats["examples"]) < 10:
                        stats["examples"].append(f"{key} at input {i}")
                    current, start = None, int(i) + 1
                elif kind == "crash":
                    stats["examples"].append(f"crash at input {current}: {rest}")
                elif kind == "peak_kb":
                    stats["peak_rss_mb"] = max(stats["peak_rss_mb"], int(rest) / 1024)
            rc = proc.wait()
            if current is not None:  # died (signal, MemoryError...) or crashed on `current`
                stats["inputs"] += 1
                stats["crashes"] += 1
                if rc < 0:
                    stats["examples"].append(f"signal {-rc} at input {current}")
                start = current + 1
            elif rc != 0:
                raise SystemExit(f"{target}: child failed before any input (rc {rc})")
        stats["seconds"] = round(time.time() - t0, 1)
        summary[target] = stats
        print(json.dumps({target: stats}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    bad = sum(s["crashes"] + s["hangs"] + s["silent"] + s["unnamed"] for s in summary.values())
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=10_000, help="inputs per target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--mem-mb", type=int, default=5120, help="RLIMIT_AS of each child (MiB)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    p.add_argument("--bomb-mb", type=int, default=1200, help="inflated size of the zip bomb")
    p.add_argument("--out", help="write the summary JSON here")
    p.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
