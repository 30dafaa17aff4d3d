"""Peak memory of a fresh ``stages/infer.py`` process versus the number of views.

    python scripts/infer_memory.py --model tiny --size 112 112 --views 32 256 1024
    python scripts/infer_memory.py --model paper --size 392 518 --views 4 8 16 32

Saves a student of the named config with random weights, writes N random-noise views of the
given ``H W``, runs ``stages/infer.py`` on them in a fresh process per N and reads its peak
resident set (``ru_maxrss`` from ``os.wait4``). Prints one JSON row per N, then the
least-squares slope (MB per added view), intercept and the projection at ``--project`` views.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_infer(images: Path, checkpoint: Path, out: Path, size: int, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "stages" / "infer.py"), str(images), "--checkpoint",
           str(checkpoint), "--output-dir", str(out), "--size", str(size), "--device", "cpu",
           "--params", str(ROOT / "params.yaml")] + extra
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if status != 0:
        raise RuntimeError(f"infer failed ({status}):\n{err[-2000:]}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024.0, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    p.add_argument("--views", type=int, nargs="+", default=[32, 256])
    p.add_argument("--project", type=int, default=1000)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder)")
    args = p.parse_args(argv)
    import torch

    from distill3r.bench_infer import write_scene
    from distill3r.models import build_student, save_student

    H, W = args.size
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        ckpt = save_student(build_student(args.model), tmp / "student")
        rows = []
        for n in sorted(args.views):
            scene = write_scene(tmp / f"views_{n}", n, H, W, seed=n)
            row = {"model": args.model, "size": [H, W], "views": n,
                   **run_infer(scene, ckpt, tmp / "out", max(H, W), [])}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if len(rows) >= 2:
            v = np.array([r["views"] for r in rows], float)
            m = np.array([r["peak_rss_mb"] for r in rows])
            slope, intercept = np.polyfit(v, m, 1)
            print(json.dumps({"slope_mb_per_view": slope, "intercept_mb": intercept,
                              f"projected_mb_at_{args.project}": intercept
                              + slope * args.project}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
