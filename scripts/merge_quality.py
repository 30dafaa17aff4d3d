"""Quality and time of decoder token merging (``model.merge``) on many-view demo scenes.

    python scripts/merge_quality.py --checkpoint models/student --views 64 128 \
        --scenes 3 --ratios 0.25 0.5 0.75 [--workdir /tmp] [--out merge_quality.json]

Renders ``--scenes`` demo rooms (``distill3r.data.demo``, seed ``--seed``: rooms the demo
training never saw) with ``max(--views)`` views each, then for every view count scores the
student without merging and with every ratio on the same samples (the ``demo`` benchmark
protocol of the ``benchmark`` stage: that many random views of a scene, AbsRel, Chamfer after the
confidence-weighted alignment, PnP poses) and prints per setting the mean metrics, the
seconds per scene (the whole forward) and the relative change against no merging.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

KEYS = ("depth_abs_rel", "chamfer", "acc_mean", "comp_mean", "pnp_rra_15", "pnp_rta_15",
        "pnp_maa_30", "seconds_per_scene")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--views", type=int, nargs="+", default=[64, 128])
    p.add_argument("--scenes", type=int, default=3)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--keep-views", type=int, default=1)
    p.add_argument("--seed", type=int, default=1017)
    p.add_argument("--size", type=int, default=224, help="rendered image side")
    p.add_argument("--long-side", type=int, default=112, help="evaluation grid long side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    import torch

    from distill3r.benchmarks.models import StudentModel
    from distill3r.benchmarks.runner import run_benchmarks
    from distill3r.config import BenchmarkParams, BenchmarkSpec, DemoParams, Params
    from distill3r.data.demo import render_demo
    from distill3r.models.merge import TokenMerge

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp) / "demo"
        render_demo(root, DemoParams(num_scenes=args.scenes, views_per_scene=max(args.views),
                                     height=args.size, width=args.size, seed=args.seed,
                                     workers=1), progress=False)
        models = {"none": StudentModel(args.checkpoint, "cpu", "bf16")}
        for ratio in args.ratios:
            model = StudentModel(args.checkpoint, "cpu", "bf16")
            model.model.decoder.merge = TokenMerge(ratio, args.keep_views)
            models[f"ratio_{ratio}"] = model
        for views in args.views:
            params = Params()
            params.benchmark = BenchmarkParams(
                benchmarks=[BenchmarkSpec("demo", str(root), views=views, samples=args.scenes)],
                models=["student"], long_side=args.long_side, device="cpu", dtype="bf16")
            report = run_benchmarks(params, models, Path(tmp) / f"report_{views}.json")
            scores = report["results"]["demo"]
            base = scores["none"]
            rows = {}
            for name, got in scores.items():
                row = {k: got.get(k) for k in KEYS}
                row["relative_change"] = {k: (got[k] - base[k]) / abs(base[k])
                                          for k in KEYS if base.get(k)}
                rows[name] = row
                print(json.dumps({"views": views, "setting": name, **row}), flush=True)
            results[f"views_{views}"] = rows
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
