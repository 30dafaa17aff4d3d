"""Cache stage: run the teacher over view samples of the manifest and write WebDataset shards.

    python stages/cache.py --params params.yaml --manifest data/manifest.csv --out data/cache
    # several machines/GPUs: each builds a disjoint part, then one runs the index step
    python stages/cache.py ... --shard-index 0 --num-shards 4
    python stages/cache.py ... --finalize

Rerunning after an interruption resumes (complete shards are kept, the rest rebuilt).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.cli import run_stage, stage_parser


def _cache(args, params) -> int:
    from distill3r.cache.writer import build_cache, finalize_cache, plan_cache
    from distill3r.teachers import get_teacher

    if args.finalize:
        plan = plan_cache(args.manifest, params.cache, get_teacher(params.teacher))
        if not finalize_cache(plan, args.out):
            print("cache: error: incomplete, some parts have not finished", file=sys.stderr)
            return 1
        print(f"cache complete: {args.out}")
        return 0
    summary = build_cache(args.manifest, args.out, params, shard_index=args.shard_index,
                          num_shards=args.num_shards, progress=not args.no_progress)
    state = "complete" if summary["complete"] else "part done (run --finalize after all parts)"
    print(f"cache {state}: built {summary['built']} shard(s), {summary['shards']} shards per "
          f"split, {summary['samples_per_shard']} samples per shard -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--manifest", required=True, help="manifest CSV (manifest stage output)")
    parser.add_argument("--out", required=True, help="cache folder (<out>/<split>/shard-*.tar)")
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--finalize", action="store_true",
                        help="only run the index step (after every part has finished)")
    return run_stage("cache", parser, _cache, argv)


if __name__ == "__main__":
    sys.exit(main())
