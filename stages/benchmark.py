"""Stage ``benchmark``: score the student, the teachers and the baselines on public benchmarks.

    python stages/benchmark.py --params params.yaml --checkpoint models/student \
        --out reports/benchmark.json --table reports/benchmark.md \
        [--run-ref reports/mlflow_run.json]

Reads the ``benchmark`` section (benchmarks with their roots, models, grid, seed), ``eval``
(metric settings), ``teacher`` (the Fast3R adapter's settings) and ``data`` (the demo split).
A benchmark whose root is null or absent is skipped with a message. When the ``--run-ref``
file exists the report is logged to that MLflow run as ``benchmark.<benchmark>.<model>.*``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.cli import run_stage, stage_parser


def _benchmark(args, params) -> None:
    from distill3r.benchmarks import build_model, run_benchmarks
    from distill3r.tracking import log_report, optional_run_ref

    ref = optional_run_ref(args.run_ref)
    bp = params.benchmark
    models = {name: build_model(name, args.checkpoint, params.teacher, bp.device, bp.dtype)
              for name in bp.models}
    report = run_benchmarks(params, models, args.out, args.table)
    if args.table:
        print(Path(args.table).read_text())
    if ref is not None:
        log_report(report, ref, prefix="benchmark")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", help="student folder (needed when models lists student)")
    parser.add_argument("--out", required=True, help="report JSON, e.g. reports/benchmark.json")
    parser.add_argument("--table", help="Markdown table to write, e.g. reports/benchmark.md")
    parser.add_argument("--run-ref", help="MLflow run reference of the train stage (if present)")
    return run_stage("benchmark", parser, _benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
