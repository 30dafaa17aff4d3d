"""Checkpoint I/O and small callbacks of the training run.

- :class:`AtomicCheckpointIO`: writes a checkpoint to a temporary file in the same folder,
  fsyncs it and ``os.replace``-s it over the target, so an interrupted save (SIGKILL, full disk)
  leaves the previous ``last.ckpt`` intact; loads with ``torch.load(weights_only=True)`` always
  (Lightning checkpoints of this project hold only tensors, numbers, strings and containers).
- :class:`StepPrinter`: one line every ``every`` optimiser steps (step, loss, lr, smoothed
  samples/s, elapsed, ETA) on rank 0 (logs that DVC and CI capture; the stage adds a progress
  bar unless ``--no-progress``), and the per-step training curve as CSV.
- :class:`KeyRecorder`: appends the sample keys of every training batch of this rank to
  ``<folder>/rank<R>.jsonl`` (debugging and the DDP disjointness test).
- :class:`WeightEMA`: an exponential moving average of the weights (``train.ema_decay``) that
  validation and the saved student use.
- :func:`write_curves`: the validation history as CSV (``dvc plots``) and the first and final
  validation metrics as JSON (``dvc metrics``).
"""

from __future__ import annotations

import csv
import json
import pickle
import re
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

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
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
                AttributeError, TypeError, zipfile.BadZipFile) as exc:
            found = re.search(r"(?i)unsupported global:? [^\s]+(?: [^\s]+)?", str(exc))
            why = found.group(0) if found else type(exc).__name__
            raise ValueError(f"{path}: refused: not a training checkpoint that loads without "
                             f"unpickling code ({why}); delete it to train from the start") \
                from None


class StepPrinter(L.Callback):
    """Every ``every`` optimiser steps on rank 0: print ``[train] step S/T (P%) loss=... lr=...
    samples/s=... elapsed ... eta ...`` (samples/s smoothed over the printed intervals, ETA from
    it) and, with ``csv_path``, rewrite the per-step training curve (``step, loss, lr,
    samples_per_s, elapsed_s``; for ``dvc plots``). A resumed run keeps the rows up to its step.
    """

    FIELDS = ("step", "loss", "lr", "samples_per_s", "elapsed_s")

    def __init__(self, every: int, csv_path: Optional[str | Path] = None) -> None:
        self.every = max(int(every), 1)
        self.csv_path = None if csv_path is None else Path(csv_path)
        self._printed = -1  # with gradient accumulation several batches end on one step
        self._rows: list[dict[str, float]] = []
        self._rate: Optional[float] = None
        self._last: Optional[tuple[int, float]] = None
        self._start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._last = (trainer.global_step, self._start)
        if self.csv_path is not None and self.csv_path.is_file() and trainer.global_step > 0:
            with open(self.csv_path, newline="") as f:
                self._rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)
                              if float(row.get("step") or 0) <= trainer.global_step]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero or step == 0 or step % self.every or step == self._printed:
            return
        self._printed = step
        now = time.perf_counter()
        last_step, last_time = self._last or (0, self._start)
        self._last = (step, now)
        steps_per_s = (step - last_step) / max(now - last_time, 1e-9)
        self._rate = steps_per_s if self._rate is None else 0.7 * self._rate + 0.3 * steps_per_s
        m = trainer.callback_metrics
        values = {k: float(m[f"train/{k}"]) for k in ("loss", "lr", "samples_per_s")
                  if f"train/{k}" in m}
        if "samples_per_s" in values:  # the smoothed rate, in samples
            samples_per_step = values["samples_per_s"] / max(steps_per_s, 1e-9)
            values["samples_per_s"] = self._rate * samples_per_step
        eta = (trainer.max_steps - step) / max(self._rate, 1e-9)
        parts = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        print(f"[train] step {step}/{trainer.max_steps} ({100 * step / trainer.max_steps:.0f}%) "
              f"{parts} elapsed {_duration(now - self._start)} eta {_duration(eta)}", flush=True)
        if self.csv_path is not None:
            self._rows.append({"step": step, **values, "elapsed_s": round(now - self._start, 3)})
            with replacing(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self._rows)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class WeightEMA(WeightAveraging):
    """Exponential moving average of the module's weights: after every optimiser step from
    ``start_step`` on, ``avg = decay * avg + (1 - decay) * weights`` (the first update copies
    the weights), kept on the training device (one fused ``lerp`` over all tensors).

    Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` does the rest: every
    validation runs on the average, the average is copied into the module when training ends
    (so the saved student is the average), and a checkpoint holds the average as its
    ``state_dict`` and the trained weights as ``current_model_state``, so ``--resume`` continues
    both. Not for sharded strategies (FSDP, DeepSpeed), whose ranks hold parameter shards.
    """

    def __init__(self, decay: float, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.start_step = int(start_step)

    def should_update(self, step_idx: Optional[int] = None,
                      epoch_idx: Optional[int] = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # setup runs before the strategy moves the module to its device: place the average
        # there directly, not on the CPU with a device-to-host copy every step
        self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)


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
                 metrics: Optional[str | Path], extra: Optional[dict] = None) -> None:
    """The validation history as CSV (``plots``: one row per validation, for ``dvc plots``) and
    its first and last rows, plus ``extra``, as JSON (``metrics``); None skips a file."""
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
        write_json(metrics, {"final_val": history[-1], "first_val": history[0], **(extra or {})})
