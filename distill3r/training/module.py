"""The Lightning module: student + distillation loss, AdamW (or Muon + AdamW), warmup-cosine
schedule.

Batches are the collated cache samples of :mod:`distill3r.training.data`: ``images``
[B,N,3,H,W] float in [0,1] and the teacher targets ``xyz_global``/``xyz_local`` [B,N,H,W,3],
``conf_global``/``conf_local``/``mask`` [B,N,H,W] (plus ``key``: list of str).

Logged (rank 0, Lightning's logger): per optimiser step ``train/loss`` and every loss term
``train/<term>``, ``train/lr``, ``train/grad_norm`` (before clipping) and
``train/samples_per_s`` (all ranks, measured between consecutive steps so data loading counts);
per validation ``val/loss`` and ``val/<term>`` (sample-weighted means over every rank) and one
summary line on stdout. The validation before the first step (Lightning's sanity check, run on
all validation batches) is logged at its step too, so every curve has a starting point.

Gradients are clipped (``train.grad_clip``, by their total norm) in
:meth:`DistillModule.on_before_optimizer_step` with the norm it logs, where every rank holds
whole gradients (one device, DDP); sharded strategies (FSDP, DeepSpeed) leave clipping to
Lightning. Where the module clips and no fp16 gradient scaler is in use (bf16, fp32), the
AdamW is torch's fused kernel (:func:`~distill3r.training.schedule.build_optimizer`).

A non-finite loss or gradient stops training with :class:`NonFiniteLossError` naming the step
and the loss terms, on every rank at once (no rank is left waiting in an all-reduce). Saving a
checkpoint whose weights are not finite is refused, so ``last.ckpt`` always holds a usable
state.

A checkpoint also holds torch's global RNG state (the CPU generator and, where training runs on
CUDA, the device's), from which the decoder draws its random image indices every training step;
a resumed run restores it, so it trains the same weights as the run that was not interrupted.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import lightning as L
import torch

from distill3r.config import SHARDED_STRATEGIES, LossParams, ModelParams, TrainParams, to_dict
from distill3r.losses import DistillationLoss
from distill3r.models import build_student
from distill3r.training.schedule import build_optimizer

log = logging.getLogger(__name__)

TARGET_KEYS = ("xyz_global", "xyz_local", "conf_global", "conf_local", "mask")


def clips_in_module(train: TrainParams) -> bool:
    """Whether :class:`DistillModule` clips the gradients itself; with a sharded strategy
    (ranks hold parameter shards, not whole gradients) the trainer does."""
    return train.strategy not in SHARDED_STRATEGIES


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient."""


def _terms_text(loss: torch.Tensor, details: dict[str, torch.Tensor]) -> str:
    parts = [f"loss={float(loss.detach()):.6g}"]
    parts += [f"{k}={float(v.detach()):.6g}" for k, v in details.items() if k != "loss"]
    return ", ".join(parts)


class DistillModule(L.LightningModule):
    """Student + :class:`DistillationLoss` trained with AdamW (see module doc).

    ``run_info`` (plain JSON-able dict, e.g. the cache fingerprint) is stored in every
    checkpoint under ``"distill3r"`` together with the params, so a resume can be checked.
    """

    def __init__(self, model: ModelParams, loss: LossParams, train: TrainParams,
                 run_info: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        self.model_params, self.loss_params, self.train_params = model, loss, train
        self.run_info = dict(run_info or {})
        self.student = build_student(model.name, model.encoder_weights, model.head_chunk_size)
        self.loss_fn = DistillationLoss(loss)
        self._last_step_time: Optional[float] = None
        self._val_sums: dict[str, torch.Tensor] = {}
        self._val_count = torch.zeros(())
        self.val_history: list[dict[str, float]] = []

    # -- steps ------------------------------------------------------------------------------
    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred = self.student(batch["images"])
        return self.loss_fn(pred, {k: batch[k] for k in TARGET_KEYS})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, details = self._loss(batch)
        bad = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)),
                                                            all=False)
        if bad:
            raise NonFiniteLossError(
                f"non-finite training loss at step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}, keys {batch.get('key')}): "
                f"{_terms_text(loss, details)}; lower train.lr or check the cache")
        size = batch["images"].shape[0]
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=size)
        for name, value in details.items():
            if name != "loss":
                self.log(f"train/{name}", value.detach(), on_step=True, batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        # the logger's step: the optimiser step this batch completes, as StepPrinter prints it
        self.log("step", float(self.global_step + 1), on_step=True)
        now = time.perf_counter()
        if self._last_step_time is not None:
            samples = size * self.trainer.world_size
            self.log("train/samples_per_s", samples / max(now - self._last_step_time, 1e-9),
                     on_step=True)
        self._last_step_time = now
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # before clipping
        if not torch.isfinite(norm):  # gradients are all-reduced: every rank agrees
            raise NonFiniteLossError(f"non-finite gradient norm at step {self.global_step}: "
                                     f"{float(norm)}; lower train.lr or check the cache")
        self.log("train/grad_norm", norm, on_step=True)
        if self.train_params.grad_clip and clips_in_module(self.train_params):
            torch.nn.utils.clip_grads_with_norm_(params, self.train_params.grad_clip, norm)

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    # -- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums, self._val_count = {}, torch.zeros((), device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, details = self._loss(batch)
        size = batch["images"].shape[0]
        for name, value in {"loss": loss, **details}.items():
            value = value.detach().float() * size
            self._val_sums[name] = self._val_sums.get(name, 0.0) + value
        self._val_count += size

    def on_validation_epoch_end(self) -> None:
        reduce = self.trainer.strategy.reduce
        count = reduce(self._val_count.clone(), reduce_op="sum")
        means = {name: float(reduce(total.clone(), reduce_op="sum") / count)
                 for name, total in sorted(self._val_sums.items(), key=lambda kv: kv[0] != "loss")}
        step = self.global_step
        self.val_history = [r for r in self.val_history if r["step"] != step]
        self.val_history.append({"step": step, **means})
        if self.trainer.sanity_checking:  # Lightning drops self.log here: log directly
            if self.trainer.is_global_zero and self.logger is not None:
                self.logger.log_metrics({f"val/{k}": v for k, v in means.items()}, step=step)
        else:  # already reduced over ranks: the sync is a no-op that silences a warning
            for name, value in means.items():
                self.log(f"val/{name}", value, sync_dist=True)
            self.log("step", float(step), sync_dist=True)  # Lightning's step key for the logger
        if self.trainer.is_global_zero:
            terms = " ".join(f"{k}={v:.5g}" for k, v in means.items())
            print(f"[val] step {step}: {terms} ({int(count)} samples)", flush=True)

    # -- optimiser --------------------------------------------------------------------------
    def configure_optimizers(self):
        tp = self.train_params
        total = int(self.trainer.estimated_stepping_batches)
        # a gradient scaler (fp16) unscales inside a fused step, after this module has clipped
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        optimizer, scheduler = build_optimizer(
            self.student, tp.lr, tp.betas, tp.weight_decay, tp.min_lr, tp.warmup_steps, total,
            fused=clips_in_module(tp) and scaler is None, kind=tp.optimizer,
            momentum=tp.muon_momentum, ns_steps=tp.muon_ns_steps)
        per_step = (tp.batch_size * tp.accumulate_grad_batches * self.trainer.world_size)
        log.info("schedule: %s, %d optimiser steps of %d samples, warmup %d, lr %g -> %g",
                 tp.optimizer, total, per_step, min(tp.warmup_steps, total), tp.lr, tp.min_lr)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [n for n, p in self.student.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(f"refusing to save a checkpoint at step {self.global_step}:"
                                     f" non-finite weights in {bad[:5]}")
        checkpoint["distill3r"] = {"model": to_dict(self.model_params),
                                   "loss": to_dict(self.loss_params),
                                   "train": to_dict(self.train_params), **self.run_info}
        checkpoint["distill3r_val_history"] = list(self.val_history)
        checkpoint["distill3r_rng"] = _rng_state(self.trainer.strategy.root_device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("distill3r", {})
        mine = {"model": to_dict(self.model_params), "loss": to_dict(self.loss_params),
                **self.run_info}
        diff = sorted(k for k in mine if k in saved and saved[k] != mine[k])
        if diff:
            raise ValueError(f"cannot resume: the checkpoint was trained with different {diff} "
                             f"(saved {[saved[k] for k in diff]}, now {[mine[k] for k in diff]});"
                             f" train without --resume to start over")
        self.val_history = list(checkpoint.get("distill3r_val_history", []))
        # Lightning restores before it moves the module to its device: ask the strategy
        if "distill3r_rng" in checkpoint:  # absent from checkpoints of earlier versions
            _set_rng_state(checkpoint["distill3r_rng"], self.trainer.strategy.root_device)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Torch's global RNG state: ``cpu`` and, on a CUDA device, ``cuda`` (that device's)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
