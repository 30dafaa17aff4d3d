"""Checkpoint I/O and small callbacks of the training run.

- :class:`AtomicCheckpointIO`: writes a checkpoint to a temporary file in the same folder,
  fsyncs it and ``os.replace``-s it over the target, so an interrupted save (SIGKILL, full disk)
  leaves the previous ``last.ckpt`` intact; loads with ``torch.load(weights_only=True)`` always
  (Lightning checkpoints of this project hold only tensors, numbers, strings and containers).
- :class:`StepPrinter`: one line every ``every`` optimiser steps (step, loss, lr, samples/s),
  on rank 0 (logs that DVC and CI capture; the stage adds a progress bar unless
  ``--no-progress``).
- :class:`KeyRecorder`: appends the sample keys of every training batch of this rank to
  ``<folder>/rank<R>.jsonl`` (debugging and the DDP disjointness test).
- :func:`write_curves`: the validation history as CSV (``dvc plots``) and the first and final
  validation metrics as JSON (``dvc metrics``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from distill3r.atomic import replacing
from distill3r.jsonio import write_json


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save = temp file + fsync + ``os.replace``; load = ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        with replacing(path, fsync=True) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only: Optional[bool] = None):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: checkpoint not found")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class StepPrinter(L.Callback):
    """Print ``[train] step S/T loss=... lr=... samples/s=...`` every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = max(int(every), 1)
        self._printed = -1  # with gradient accumulation several batches end on one step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero or step == 0 or step % self.every or step == self._printed:
            return
        self._printed = step
        m = trainer.callback_metrics
        parts = [f"{k.split('/', 1)[1]}={float(m[k]):.4g}"
                 for k in ("train/loss", "train/lr", "train/samples_per_s") if k in m]
        print(f"[train] step {step}/{trainer.max_steps} epoch {trainer.current_epoch} "
              + " ".join(parts), flush=True)


class KeyRecorder(L.Callback):
    """Append ``{"step", "epoch", "keys"}`` per training batch to ``folder/rank<R>.jsonl``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch,
                "keys": list(batch["key"])}
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def write_curves(history: list[dict[str, float]], plots: Optional[str | Path],
                 metrics: Optional[str | Path]) -> None:
    """The validation history as CSV (``plots``: one row per validation, for ``dvc plots``) and
    its first and last rows as JSON (``metrics``: for ``dvc metrics``); None skips a file."""
    if not history:
        return
    if plots is not None:
        Path(plots).parent.mkdir(parents=True, exist_ok=True)
        names = list(dict.fromkeys(k for row in history for k in row))
        with open(plots, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            writer.writerows(history)
    if metrics is not None:
        write_json(metrics, {"final_val": history[-1], "first_val": history[0]})
