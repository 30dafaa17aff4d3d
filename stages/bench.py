"""Stage ``bench``: inference time, peak memory and FLOPs of the student against the reference.

    python stages/bench.py --params params.yaml --out reports/bench.json --plot reports/bench.png

Reads the ``bench`` section of the params (``profile: cpu`` uses its models, views and sizes;
``profile: paper`` the published table's shapes on a CUDA device); each row runs in a fresh
process (see :mod:`distill3r.bench`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.cli import run_stage, stage_parser


def _bench(args, params) -> None:
    from distill3r.bench import bench_stage

    bench_stage(params.bench, args.out, args.plot, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", default="reports/bench.json", help="metrics JSON to write")
    parser.add_argument("--plot", default="reports/bench.png", help="figure to write")
    return run_stage("bench", parser, _bench, argv)


if __name__ == "__main__":
    sys.exit(main())
