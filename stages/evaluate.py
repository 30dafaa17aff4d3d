"""Evaluate the trained student on the validation shards of the teacher cache.

    python stages/evaluate.py --params params.yaml --checkpoint models/student \
        --cache data/cache --out reports/eval.json [--run-ref reports/mlflow_run.json] \
        [--max-samples N] [--no-progress]

Reads ``<cache>/val`` (scored) and ``<cache>/train`` (ground-truth depth for the layout-prior
baseline) and the ``eval`` section (``model.name`` is checked against the checkpoint). Writes
``--out`` (the detailed report), ``--headline`` (the headline metrics ``dvc metrics`` shows,
with the train stage's ``--train-metrics``) and prints a summary table; when the ``--run-ref`` file
exists the metrics are also logged to that MLflow run as ``eval.<block>.<metric>``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.cli import run_stage, stage_parser


def _evaluate(args, params) -> None:
    from distill3r.evaluation.runner import format_table, run_evaluation
    from distill3r.jsonio import read_json, write_json
    from distill3r.reports import headline_metrics
    from distill3r.registry import tag_run_versions
    from distill3r.tracking import log_report, optional_run_ref

    if args.max_samples is not None:
        params.eval = dataclasses.replace(params.eval, max_samples=args.max_samples)
        params.eval.validate("eval")
    ref = optional_run_ref(args.run_ref)
    train_report = None
    if args.train_metrics and Path(args.train_metrics).is_file():
        train_report = read_json(args.train_metrics, "train metrics")
    result = run_evaluation(params, args.checkpoint, args.cache, args.out,
                            progress=not args.no_progress)
    if args.headline:
        write_json(args.headline, headline_metrics(result.report, train_report))
    report = result.report
    print(format_table(report))
    logged = log_report(report, ref) if ref is not None else None
    run = f", MLflow run {logged}" if logged else ""
    if logged:  # the registered student of that run carries the headline metrics too
        versions = tag_run_versions(ref, headline_metrics(report, train_report))
        run += "".join(f", model {v}" for v in versions)
    print(f"evaluate: {report['num_samples']} sample(s) ({report['num_samples_gt']} with ground "
          f"truth), {report['seconds_per_sample']:.3f} s/sample -> {result.out_path}{run}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="student folder (model.safetensors "
                        "+ config.json), e.g. models/student")
    parser.add_argument("--cache", required=True,
                        help="cache folder holding train/ and val/ shards")
    parser.add_argument("--out", required=True, help="the detailed report to write, e.g. "
                        "reports/eval.json")
    parser.add_argument("--run-ref", help="MLflow run reference of the train stage (used if "
                        "present)")
    parser.add_argument("--max-samples", type=int, help="override eval.max_samples")
    parser.add_argument("--train-metrics", help="the train stage's metrics JSON (for --headline)")
    parser.add_argument("--headline", help="write the headline metrics JSON (DVC metrics) here")
    return run_stage("evaluate", parser, _evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
