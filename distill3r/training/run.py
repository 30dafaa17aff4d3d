"""The train stage: cache shards -> trained student, checkpoints and an MLflow run.

:func:`train` builds the data module, the Lightning module and the trainer from the params,
runs (or resumes) the fit and, on global rank 0, saves the student, logs it to MLflow and
writes the run reference for the evaluate stage.

Under DDP (``train.strategy: ddp``) Lightning starts the other ranks by re-running the same
command line with ``LOCAL_RANK`` set, so every rank runs :func:`train` from the top; everything
with a side effect outside the checkpoint folder is guarded by ``trainer.is_global_zero``.

Checkpoints (``<checkpoints>/last.ckpt`` every ``train.checkpoint_every_steps`` optimiser steps)
are written atomically (:class:`~distill3r.training.callbacks.AtomicCheckpointIO`) and loaded
with ``weights_only=True`` (``Trainer.fit(..., weights_only=True)``: Lightning 2.6 passes it to
the checkpoint IO, and our IO forces it anyway). ``resume=True`` continues from ``last.ckpt``:
global step, optimiser moments, scheduler, the data order (an interrupted epoch continues
with its unseen batches) and the MLflow run (its id is kept next to the checkpoints in
``mlflow_run.json``). A larger ``max_steps`` on resume stretches the remaining cosine (the
first resumed step still uses the saved learning rate); the model, loss and cache must match
the checkpoint. Without ``resume`` stale checkpoints are deleted first, so a
run with new params never picks up an old state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint

from distill3r.config import Params, RuntimeParams, TrainParams
from distill3r.devices import bf16_supported
from distill3r.models import save_student
from distill3r.runtime import choose_threads
from distill3r.registry import ARTIFACT, register_student
from distill3r.tracking import (log_artifacts_dir, make_lightning_logger, read_run_ref,
                                resolve_tracking_uri, start_run, write_run_ref)
from distill3r.training.augment import Augmenter
from distill3r.training.callbacks import (AtomicCheckpointIO, KeyRecorder, StepPrinter,
                                          WeightEMA, write_curves)
from distill3r.training.data import CacheDataModule, check_cache
from distill3r.training.module import DistillModule, clips_in_module

log = logging.getLogger(__name__)

LAST = "last.ckpt"
RUN_FILE = "mlflow_run.json"  # the MLflow run of the checkpoints in this folder
STEP_PREFIX = "step-"


@dataclass
class TrainResult:
    """What :func:`train` produced (``run_id`` is None on ranks other than 0)."""

    out_dir: Path
    global_step: int
    run_id: Optional[str]
    val_history: list[dict[str, float]]
    student: torch.nn.Module  # the trained student (eval mode, CPU on rank 0)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``train.precision`` for Lightning; bf16 on a CPU without native bf16
    (:func:`~distill3r.devices.bf16_supported`, the policy of every stage) falls back to 32."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision.startswith("bf16") and on_cpu and not bf16_supported(torch.device("cpu")):
        warnings.warn(f"train.precision={precision!r} but this CPU has no native bf16: "
                      "falling back to 32-bit", stacklevel=2)
        return "32-true"
    return precision


def set_threads(runtime: RuntimeParams, trainer: L.Trainer) -> int:
    """Torch intra-op threads of this process: ``runtime.threads``, or with null the cores
    divided by the CPU ranks of this node (:func:`distill3r.runtime.choose_threads`: OpenMP
    threads that outnumber the cores slow a step down many times); returns the count in use."""
    cpu_ranks = trainer.num_devices if isinstance(trainer.accelerator, CPUAccelerator) else 1
    torch.set_num_threads(choose_threads(runtime.threads, cpu_ranks, runtime.adapt_to_load))
    return torch.get_num_threads()


def cache_index_digest(cache_dir: Path) -> str:
    """SHA-256 (16 hex) of the train and val ``index.json`` files: names the exact shards (the
    cache's own ``fingerprint`` names what built them: manifest, sampling params, teacher)."""
    digest = hashlib.sha256()
    for split in ("train", "val"):
        digest.update((cache_dir / split / "index.json").read_bytes())
    return digest.hexdigest()[:16]


def clear_checkpoints(folder: Path, keep_last: bool) -> None:
    """Delete temporary files of interrupted saves in ``folder`` and, unless ``keep_last``, this
    project's checkpoints and run file (nothing else)."""
    stale = list(folder.glob(".*.ckpt.tmp-*"))
    if not keep_last:
        stale += [folder / LAST, folder / RUN_FILE, *folder.glob(f"{STEP_PREFIX}*.ckpt")]
    for path in stale:
        path.unlink(missing_ok=True)


def _trainer(tp: TrainParams, checkpoints: Path, callbacks: list, progress: bool,
             step_plots: Optional[Path] = None) -> L.Trainer:
    precision = resolve_precision(tp.precision, tp.accelerator)
    if tp.ema_decay:  # the average starts from the weights at the end of the warmup
        callbacks = [*callbacks, WeightEMA(tp.ema_decay, start_step=tp.warmup_steps)]
    # checkpoints/last.ckpt only; step-named copies are not kept (save_top_k=0).
    checkpoint = ModelCheckpoint(dirpath=checkpoints, filename=STEP_PREFIX + "{step:08d}",
                                 every_n_train_steps=tp.checkpoint_every_steps, save_top_k=0,
                                 save_last=True, enable_version_counter=False)
    return L.Trainer(
        accelerator=tp.accelerator, devices=tp.devices, strategy=tp.strategy,
        num_nodes=tp.num_nodes, precision=precision, max_steps=tp.max_steps, max_epochs=-1,
        accumulate_grad_batches=tp.accumulate_grad_batches,
        # the module clips where ranks hold whole gradients (DistillModule)
        gradient_clip_val=None if clips_in_module(tp) else (tp.grad_clip or None),
        gradient_clip_algorithm="norm",
        # val_check_interval counts training *batches*; val_every_steps counts optimiser steps.
        val_check_interval=tp.val_every_steps * tp.accumulate_grad_batches,
        check_val_every_n_epoch=None, num_sanity_val_steps=-1,
        log_every_n_steps=tp.log_every_steps, reload_dataloaders_every_n_epochs=1,
        callbacks=[checkpoint, StepPrinter(tp.log_every_steps, step_plots), *callbacks],
        plugins=[AtomicCheckpointIO()], logger=False, default_root_dir=checkpoints,
        enable_progress_bar=progress, enable_model_summary=True, deterministic=False,
    )


def _tracked_run(rank0: bool, params: Params, tracking_uri: str, checkpoints: Path,
                 ckpt_path: Optional[Path], tags: dict[str, str]):
    """The MLflow run on rank 0 (the resumed checkpoint's run when there is one, else a new
    run with every param), with ``tags`` set; a no-op context on the other ranks."""
    if not rank0:
        return contextlib.nullcontext()
    tp = params.train
    run_id = _previous_run(checkpoints, ckpt_path, tracking_uri)
    return start_run(None if run_id else params, tracking_uri, tp.experiment,
                     run_name=run_name(params),
                     tags=tags, system_metrics=tp.system_metrics,
                     run_id=run_id)


def run_name(params: Params) -> str:
    """What ran, for the MLflow run list: ``<DVC experiment or 'train'> <model> <steps> steps``."""
    exp = os.environ.get("DVC_EXP_NAME") or "train"
    return f"{exp} {params.model.name} {params.train.max_steps} steps"


def _previous_run(checkpoints: Path, ckpt_path: Optional[Path], tracking_uri: str
                  ) -> Optional[str]:
    """The MLflow run id of the checkpoint being resumed, if recorded for this tracking URI."""
    run_file = checkpoints / RUN_FILE
    if ckpt_path is None or not run_file.is_file():
        return None
    ref = read_run_ref(run_file)
    if ref.tracking_uri != tracking_uri:
        warnings.warn(f"{run_file}: run {ref.run_id} was tracked at {ref.tracking_uri}, now "
                      f"{tracking_uri}: starting a new MLflow run", stacklevel=2)
        return None
    return ref.run_id


def train(params: Params, cache_dir: str | Path, out_dir: str | Path,
          checkpoints_dir: str | Path, resume: bool = False,
          run_ref: Optional[str | Path] = None, max_steps: Optional[int] = None,
          keys_dir: Optional[str | Path] = None, plots: Optional[str | Path] = None,
          metrics: Optional[str | Path] = None, progress: bool = False,
          step_plots: Optional[str | Path] = None) -> TrainResult:
    """Train the student on ``<cache_dir>/train`` (validating on ``<cache_dir>/val``).

    Args:
        params: all params (``model``, ``loss``, ``train`` used; ``cache``/``teacher`` checked
            against the cache index).
        out_dir: where the student is saved (``model.safetensors`` + ``config.json``).
        checkpoints_dir: Lightning checkpoints (not tracked by DVC).
        resume: continue from ``<checkpoints_dir>/last.ckpt`` (a fresh start if there is none).
        run_ref: where to write the MLflow run reference JSON for the later stages.
        max_steps: override ``train.max_steps`` (tests, quick trials; logged as the param).
        keys_dir: record the sample keys of every batch per rank (debugging, tests).
        plots, metrics: validation curve CSV and final metrics JSON (the last with the training
            seconds and parameter count).
        progress: Lightning's progress bar (besides the step lines every
            ``train.log_every_steps``).
        step_plots: the per-step training curve CSV (every ``train.log_every_steps``).
    """
    if max_steps is not None:
        params = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                       max_steps=max_steps))
    tp = params.train
    tp.validate("train")
    cache_dir, out_dir, checkpoints = Path(cache_dir), Path(out_dir), Path(checkpoints_dir)
    augment = Augmenter(views=tp.views, shuffle_view0=tp.shuffle_view0,
                        color_jitter=tp.color_jitter, seed=tp.seed)
    data = CacheDataModule(cache_dir / "train", cache_dir / "val", tp.batch_size,
                           tp.num_workers, tp.seed, augment, tp.accumulate_grad_batches)
    check_cache(data.train_index, data.val_index, params, cache_dir)
    cache_tags = {"cache.fingerprint": str(data.train_index.get("fingerprint")),
                  "cache.index_sha256": cache_index_digest(cache_dir)}
    L.seed_everything(tp.seed, workers=True, verbose=False)
    module = DistillModule(params.model, params.loss, tp,
                           run_info={k.replace(".", "_"): v for k, v in cache_tags.items()})
    callbacks: list[Any] = [] if keys_dir is None else [KeyRecorder(keys_dir)]
    trainer = _trainer(tp, checkpoints, callbacks, progress,
                       None if step_plots is None else Path(step_plots))
    data.check_world(trainer.world_size)
    # the OpenMP wait policy sets the speed, never the results: logged and tagged with the run
    wait = os.environ.get("OMP_WAIT_POLICY", "default")
    log.info("rank %d of %d, %d torch thread(s), OpenMP wait policy %s", trainer.global_rank,
             trainer.world_size, set_threads(params.runtime, trainer), wait)
    ckpt_path = checkpoints / LAST if resume and (checkpoints / LAST).is_file() else None
    if resume and ckpt_path is None:
        warnings.warn(f"--resume: {checkpoints / LAST} not found, starting from scratch",
                      stacklevel=2)
    rank0 = trainer.is_global_zero
    if rank0:
        clear_checkpoints(checkpoints, keep_last=ckpt_path is not None)
    tracking_uri = resolve_tracking_uri(tp.tracking_uri)
    run_tags = {**cache_tags, "runtime.omp_wait_policy": wait}
    with _tracked_run(rank0, params, tracking_uri, checkpoints, ckpt_path, run_tags) as active:
        if rank0:
            write_run_ref(checkpoints / RUN_FILE, active, tracking_uri)
            trainer.loggers = [make_lightning_logger(tracking_uri, tp.experiment,
                                                     active.info.run_id)]
        started = time.perf_counter()
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        seconds = time.perf_counter() - started
        if not module.val_history or module.val_history[-1]["step"] != trainer.global_step:
            trainer.validate(module, datamodule=data, verbose=False)  # the final weights
        if rank0:
            params_m = sum(p.numel() for p in module.student.parameters()) / 1e6
            write_curves(module.val_history, plots, metrics,
                         {"seconds": round(seconds, 1), "parameters_m": round(params_m, 3)})
            save_student(module.student.cpu(), out_dir)
            log_artifacts_dir(out_dir, ARTIFACT)
            if tp.registered_model:
                register_student(tracking_uri, active.info.run_id, tp.registered_model,
                                 {**cache_tags, "model.name": params.model.name})
            if run_ref is not None:
                write_run_ref(run_ref, active, tracking_uri)
    return TrainResult(out_dir, trainer.global_step, active.info.run_id if rank0 else None,
                       module.val_history, module.student.eval())
