"""Train the student on the teacher cache (Lightning; CPU, one GPU or DDP).

    python stages/train.py --params params.yaml --cache data/cache --out models/student \
        --checkpoints checkpoints [--resume] [--run-ref reports/mlflow_run.json] \
        [--plots reports/train_curve.csv] [--metrics reports/train.json] [--max-steps N] \
        [--step-plots reports/train_steps.csv] [--no-progress]

Reads ``<cache>/train`` and ``<cache>/val`` shards and the ``model``, ``loss`` and ``train``
sections (``cache``/``teacher`` are checked against the cache index). Writes the student to
``--out``, checkpoints (``last.ckpt``, for ``--resume``) to ``--checkpoints``, an MLflow run
(``train.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``) and its
reference to ``--run-ref``. With ``train.strategy: ddp`` Lightning re-runs this command once
per extra rank.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.cli import run_stage, stage_parser


def _train(args, params) -> None:
    from distill3r.training.run import train

    # Handled by design (fixed per-worker batch counts; a resumed epoch skips the batches it
    # already trained on; size-1 conv dims under DDP): noise.
    warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended")
    warnings.filterwarnings("ignore", message=r"Grad strides do not match bucket view strides")
    result = train(params, args.cache, args.out, args.checkpoints, resume=args.resume,
                   run_ref=args.run_ref, max_steps=args.max_steps, keys_dir=args.debug_keys,
                   plots=args.plots, metrics=args.metrics, step_plots=args.step_plots,
                   progress=not args.no_progress)
    if result.run_id is not None:
        print(f"train: {result.global_step} steps, student -> {result.out_dir}, "
              f"MLflow run {result.run_id}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--cache", required=True,
                        help="cache folder holding train/ and val/ shards")
    parser.add_argument("--out", required=True, help="output folder of the trained student")
    parser.add_argument("--checkpoints", required=True, help="folder of resumable checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <checkpoints>/last.ckpt (and its MLflow run)")
    parser.add_argument("--run-ref", help="write the MLflow run reference JSON here")
    parser.add_argument("--plots", help="write the validation curve CSV here")
    parser.add_argument("--metrics", help="write the final validation metrics JSON here")
    parser.add_argument("--step-plots", help="write the per-step training curve CSV here")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--debug-keys", help="append the sample keys of every batch to "
                        "<dir>/rank<R>.jsonl")
    # training.module.NonFiniteLossError is a FloatingPointError: named by its base here, so
    # that torch is first imported after the runtime is configured
    return run_stage("train", parser, _train, argv, errors=(FloatingPointError,))


if __name__ == "__main__":
    sys.exit(main())
