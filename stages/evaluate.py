"""Evaluate the trained student on the validation shards of the teacher cache.

    python stages/evaluate.py --params params.yaml --checkpoint models/student \
        --cache data/cache --out reports/eval.json [--run-ref reports/mlflow_run.json] \
        [--max-samples N] [--no-progress]

Reads ``<cache>/val`` (scored) and ``<cache>/train`` (ground-truth depth for the layout-prior
baseline) and the ``eval`` section (``model.name`` is checked against the checkpoint). Writes
``--out`` (metrics for ``dvc metrics``) and prints a summary table; when the ``--run-ref`` file
exists the metrics are also logged to that MLflow run as ``eval.<block>.<metric>``.
"""

from __future__ import annotations

import dataclasses
import sys

from distill3r.cli import run_stage, stage_parser


def _evaluate(args, params) -> None:
    from distill3r.evaluation.runner import format_table, run_evaluation

    if args.max_samples is not None:
        params.eval = dataclasses.replace(params.eval, max_samples=args.max_samples)
        params.eval.validate("eval")
    result = run_evaluation(params, args.checkpoint, args.cache, args.out,
                            run_ref=args.run_ref, progress=not args.no_progress)
    report = result.report
    print(format_table(report))
    run = f", MLflow run {result.logged_run_id}" if result.logged_run_id else ""
    print(f"evaluate: {report['num_samples']} sample(s) ({report['num_samples_gt']} with ground "
          f"truth), {report['seconds_per_sample']:.3f} s/sample -> {result.out_path}{run}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="student folder (model.safetensors "
                        "+ config.json), e.g. models/student")
    parser.add_argument("--cache", required=True,
                        help="cache folder holding train/ and val/ shards")
    parser.add_argument("--out", required=True, help="metrics JSON to write, e.g. "
                        "reports/eval.json")
    parser.add_argument("--run-ref", help="MLflow run reference of the train stage (used if "
                        "present)")
    parser.add_argument("--max-samples", type=int, help="override eval.max_samples")
    return run_stage("evaluate", parser, _evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
