"""Decode throughput of one cache reader (one loader worker) at a chosen sample shape.

    python scripts/cache_throughput.py [--views 20] [--size 224 518] [--scenes 2] \
        [--samples-per-scene 2] [--render H W] [--compression deflate|stored|auto] \
        [--passes 3] [--workdir DIR] [--json OUT]

Renders ``--scenes`` demo scenes at ``--render`` (default ``--size``; the built-in pybullet renderer: textured rooms,
so the ground-truth teacher's point maps are smooth surfaces like a real teacher's, not noise),
builds their cache with the real stages (manifest, cache; ``cache.compression`` from
``--compression``), then reads every shard of both splits ``--passes`` times in one process
and one thread, as one training loader worker does: ``reader.shard_samples`` (the strict tar
reader) followed by ``decode_sample`` (checksum, bounded npz decoding, float32 tensors).

Reports, from the fastest pass after a warm-up pass: samples/s, decoded MB/s (the bytes of the tensors
``decode_sample`` returns: images, both point maps and confidences as float32, the mask, the
ground truth), shard MB/s (bytes read from disk), and the cache size per view (shard bytes /
views). ``cpu_decoded_mb_per_s`` divides by the process's CPU time instead of the wall
time: on a shared machine it is the rate one worker reaches with a core of its own. MB = 10^6
bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _stage(name: str, *args, env: dict) -> None:
    cmd = [sys.executable, str(ROOT / "stages" / f"{name}.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _params(work: Path, args) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    h, w = args.size
    rh, rw = args.render or args.size
    raw["demo"].update(num_scenes=args.scenes, views_per_scene=args.views + 2, height=rh,
                       width=rw, workers=0)
    raw["data"]["sources"] = [{"kind": "demo", "root": str(work / "raw"), "name": None,
                               "sample_frac": 1.0, "options": {}}]
    raw["data"]["resize_max"] = max(rh, rw, h, w)
    raw["cache"].update(image_size=[h, w], views_per_sample=args.views,
                        max_samples_per_scene=args.samples_per_scene,
                        compression=args.compression)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def build(work: Path, args, env: dict) -> Path:
    """Render, list and cache the demo scenes in ``work`` (skipped when already built)."""
    params = _params(work, args)
    cache = work / f"cache-{args.compression}"
    if not (cache / "train" / "index.json").is_file():
        if not (work / "manifest.csv").is_file():
            _stage("render_demo", "--params", params, "--out", work / "raw", "--no-progress",
                   env=env)
            _stage("manifest", "--params", params, "--out", work / "manifest.csv",
                   "--images-dir", work / "images", "--no-progress", env=env)
        _stage("cache", "--params", params, "--manifest", work / "manifest.csv", "--out",
               cache, "--no-progress", env=env)
    return cache


def measure(cache: Path, passes: int) -> dict:
    """Read and decode every sample of ``cache`` (both splits) ``passes`` times; the figures
    of the fastest pass."""
    import torch

    from distill3r.cache.reader import decode_sample, shard_samples, split_shards

    torch.set_num_threads(1)
    shards = []
    for split in ("train", "val"):
        try:
            shards += split_shards(cache / split)[1]
        except ValueError:  # a split without samples
            pass
    shard_bytes = sum(s.path.stat().st_size for s in shards)
    views = sum(s.num_samples * s.shape[0] for s in shards)
    wall, cpu = [], []
    for _ in range(passes + 1):  # the first pass warms up (imports, page cache)
        decoded, samples = 0, 0
        start, start_cpu = time.perf_counter(), time.process_time()
        for shard in shards:
            for raw in shard_samples(shard.path, shard.num_samples, shard.shape):
                out = decode_sample(raw, shard.shape)
                decoded += sum(v.numel() * v.element_size() for v in out.values()
                               if isinstance(v, torch.Tensor))
                samples += 1
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    best, best_cpu = min(wall[1:]), min(cpu[1:])
    return {"shape": list(shards[0].shape), "samples": samples, "seconds": best,
            "cpu_seconds": best_cpu, "samples_per_s": samples / best,
            "decoded_mb_per_s": decoded / best / 1e6,
            "cpu_decoded_mb_per_s": decoded / best_cpu / 1e6,
            "decoded_mb_per_sample": decoded / samples / 1e6,
            "shard_mb_per_s": shard_bytes / best / 1e6,
            "kb_per_view": shard_bytes / views / 1e3, "load_average": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, default=20, help="views per sample")
    p.add_argument("--size", type=int, nargs=2, default=[224, 518], metavar=("H", "W"))
    p.add_argument("--render", type=int, nargs=2, metavar=("H", "W"),
                   help="render size of the demo scenes (default: --size; the demo profile "
                   "renders 224x224 for its 112x112 cache)")
    p.add_argument("--scenes", type=int, default=2, help="demo scenes rendered")
    p.add_argument("--samples-per-scene", type=int, default=2)
    p.add_argument("--compression", default="deflate", choices=["deflate", "stored", "auto"],
                   help="cache.compression of the cache built")
    p.add_argument("--passes", type=int, default=3, help="read passes (the fastest counts)")
    p.add_argument("--workdir", help="keep the scenes and caches here (default: a temp folder)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        figures = {"compression": args.compression, **measure(build(work, args, env),
                                                                 args.passes)}
    n, h, w = figures["shape"]
    print(f"cache decode, one worker, {n} views of {h}x{w}, compression "
          f"{figures['compression']}: {figures['samples_per_s']:.2f} samples/s, "
          f"{figures['decoded_mb_per_s']:.0f} MB/s decoded "
          f"({figures['cpu_decoded_mb_per_s']:.0f} MB/s per CPU second; "
          f"{figures['decoded_mb_per_sample']:.1f} MB per sample), "
          f"{figures['shard_mb_per_s']:.0f} MB/s of shard bytes, "
          f"{figures['kb_per_view']:.0f} KB per view on disk (load average "
          f"{figures['load_average']:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
