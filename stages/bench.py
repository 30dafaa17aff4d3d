"""Stage ``bench``: inference time, peak memory and FLOPs of the student against the reference.

    python stages/bench.py --params params.yaml --out reports/bench.json --plot reports/bench.png

Reads the ``bench`` section of the params (``profile: cpu`` uses its models, views and sizes;
``profile: paper`` the published table's shapes on a CUDA device); each row runs in a fresh
process (see :mod:`distill3r.bench`).
"""

from __future__ import annotations

import argparse

from distill3r.bench import bench_stage
from distill3r.config import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (bench section)")
    parser.add_argument("--out", default="reports/bench.json", help="metrics JSON to write")
    parser.add_argument("--plot", default="reports/bench.png", help="figure to write")
    args = parser.parse_args()
    params = load_params(args.params)
    bench_stage(params.bench, args.out, args.plot)


if __name__ == "__main__":
    main()
