"""Cache stage: run the teacher over view samples of the manifest and write WebDataset shards.

    python stages/cache.py --params params.yaml --manifest data/manifest.csv --out data/cache
    # several machines/GPUs: each builds a disjoint part, then one runs the index step
    python stages/cache.py ... --shard-index 0 --num-shards 4
    python stages/cache.py ... --finalize
Rerunning after an interruption resumes (complete shards are kept, the rest rebuilt).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--manifest", required=True, help="manifest CSV (manifest stage output)")
    parser.add_argument("--out", required=True, help="cache folder (<out>/<split>/shard-*.tar)")
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--finalize", action="store_true",
                        help="only run the index step (after every part has finished)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from distill3r.cache.writer import build_cache, finalize_cache, plan_cache
    from distill3r.config import load_params
    from distill3r.teachers import get_teacher

    try:
        params = load_params(args.params)
        if args.finalize:
            plan = plan_cache(args.manifest, params.cache, get_teacher(params.teacher))
            if not finalize_cache(plan, args.out):
                print("cache: error: incomplete, some parts have not finished", file=sys.stderr)
                return 1
            print(f"cache complete: {args.out}")
            return 0
        summary = build_cache(args.manifest, args.out, params, shard_index=args.shard_index,
                              num_shards=args.num_shards, progress=not args.no_progress)
    except ValueError as exc:  # bad params or input, or another build running: no traceback
        print(f"cache: error: {exc}", file=sys.stderr)
        return 1
    state = "complete" if summary["complete"] else "part done (run --finalize after all parts)"
    print(f"cache {state}: built {summary['built']} shard(s), {summary['shards']} shards per "
          f"split, {summary['samples_per_shard']} samples per shard -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
