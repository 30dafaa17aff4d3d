"""Train the student on the teacher cache (Lightning; CPU, one GPU or DDP).

    python stages/train.py --params params.yaml --cache data/cache --out models/student \
        --checkpoints checkpoints [--resume] [--run-ref reports/mlflow_run.json] \
        [--plots reports/train_curve.csv] [--metrics reports/train.json] [--max-steps N]
        [--step-plots reports/train_steps.csv]

Reads ``<cache>/train`` and ``<cache>/val`` shards and the ``model``, ``loss`` and ``train``
sections (``cache``/``teacher`` are checked against the cache index). Writes the student to
``--out``, checkpoints (``last.ckpt``, for ``--resume``) to ``--checkpoints``, an MLflow run
(``train.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``) and its
reference to ``--run-ref``. With ``train.strategy: ddp`` Lightning re-runs this command once
per extra rank.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from distill3r.config import load_params
from distill3r.training.module import NonFiniteLossError
from distill3r.training.run import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    p.add_argument("--cache", required=True, help="cache folder holding train/ and val/ shards")
    p.add_argument("--out", required=True, help="output folder of the trained student")
    p.add_argument("--checkpoints", required=True, help="folder of resumable checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from <checkpoints>/last.ckpt (and its MLflow run)")
    p.add_argument("--run-ref", help="write the MLflow run reference JSON here")
    p.add_argument("--plots", help="write the validation curve CSV here")
    p.add_argument("--metrics", help="write the final validation metrics JSON here")
    p.add_argument("--step-plots", help="write the per-step training curve CSV here")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--debug-keys", help="append the sample keys of every batch to "
                   "<dir>/rank<R>.jsonl")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Handled by design (fixed per-worker batch counts; a resumed epoch skips the batches it
    # already trained on; size-1 conv dims under DDP): noise.
    warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended")
    warnings.filterwarnings("ignore", message=r"Grad strides do not match bucket view strides")
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        result = train(params, args.cache, args.out, args.checkpoints, resume=args.resume,
                       run_ref=args.run_ref, max_steps=args.max_steps, keys_dir=args.debug_keys,
                       plots=args.plots, metrics=args.metrics, step_plots=args.step_plots)
    except (ValueError, NonFiniteLossError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    if result.run_id is not None:
        print(f"train: {result.global_step} steps, student -> {result.out_dir}, "
              f"MLflow run {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
