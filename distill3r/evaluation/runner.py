"""The evaluate stage: score the student on the validation shards of the teacher cache.

:func:`run_evaluation` loads the student (eval mode, ``inference_mode``, autocast in
``eval.dtype`` where the device supports it), reads ``<cache>/val`` in index order (shards in
``index.json`` order, samples in shard order; at most ``eval.max_samples``) and scores every
sample with :func:`distill3r.evaluation.protocol.evaluate_sample` in up to five ways:

- ``student``: student vs ground truth;            - ``teacher``: cached teacher vs ground truth;
- ``baseline``: fronto-parallel planes (``plane_baseline``) vs ground truth;
- ``layout_prior``: the per-pixel layout prior (``layout_baseline``) vs ground truth, the prior
  fitted from the ground-truth depth of the TRAIN split of the same cache;
- ``student_vs_teacher``: student vs the teacher maps (agreement; every sample, also those
  without ground truth, which get only this one).
The teacher is scored on its own valid pixels (``mask``; masked points are NaN), the student on
all pixels. The model runs in this process; the scoring (numpy, SciPy, OpenCV) runs in
``eval.workers`` processes (null: one per core), which changes no number. The report
(``eval.json``) holds each block averaged over samples (:func:`aggregate_metrics`;
``num_samples`` per block, ``null`` where undefined), the same per dataset under
``per_dataset``, ``seconds_per_sample`` (model forward only), ``num_samples`` and the
checkpoint fingerprint. Logging the report to MLflow is the stage's job
(:func:`distill3r.tracking.log_report`): this module computes metrics only.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from distill3r.cache.reader import check_same_build, read_index, read_split
from distill3r.config import EvalParams, Params
from distill3r.devices import autocast, resolve_device, resolve_dtype
from distill3r.evaluation.baselines import fit_layout_prior, layout_baseline, plane_baseline
from distill3r.evaluation.protocol import aggregate_metrics, evaluate_sample
from distill3r.jsonio import write_json
from distill3r.models import checkpoint_fingerprint, get_config, load_student
from distill3r.runtime import available_cores

log = logging.getLogger(__name__)

GT_BLOCKS = ("student", "teacher", "baseline", "layout_prior")
SCORE_KEYS = ("xyz_global", "xyz_local", "conf_global", "conf_local", "mask", "depth", "K",
              "c2w")
BLOCKS = ("student", "teacher", "student_vs_teacher", "baseline", "layout_prior")
TABLE_COLUMNS = (("AbsRel", "depth_abs_rel"), ("delta1", "depth_delta1"),
                 ("Chamfer", "chamfer"), ("RRA@15", "pnp_rra_15"), ("mAA30", "pnp_maa_30"))


@dataclass
class EvalResult:
    """What :func:`run_evaluation` produced: the report (as written) and its path."""

    report: dict
    out_path: Path


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def load_checked_student(checkpoint: Path, params: Params, device: torch.device):
    """The student in eval mode; ``ValueError`` if the folder is missing or unreadable, or its
    architecture differs from ``model.name`` in params (a checkpoint of another config)."""
    if not checkpoint.is_dir():
        raise ValueError(f"{checkpoint}: checkpoint folder not found (expected model.safetensors "
                         "and config.json written by the train stage)")
    try:
        model = load_student(checkpoint, device=device,
                             head_chunk_size=params.model.head_chunk_size)
    except ValueError as exc:
        raise ValueError(f"cannot load the student from {checkpoint}: {exc}") from exc
    expected = get_config(params.model.name).to_dict()
    got = model.config.to_dict()
    if got != expected:
        diff = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise ValueError(f"{checkpoint}: the checkpoint is a {got.get('name')!r} student but "
                         f"params model.name is {params.model.name!r} (differs in "
                         f"{', '.join(diff)}): retrain (dvc repro train) or set model.name to "
                         "the checkpoint's config")
    return model.eval()


def check_split(split_dir: Path, patch: int) -> dict:
    """The split's index; ``ValueError`` if missing, empty, or not a multiple of ``patch``."""
    index = read_index(split_dir)
    if not index["shards"] or int(index.get("num_samples") or 0) == 0:
        raise ValueError(f"{split_dir / 'index.json'}: the {index.get('split')} split has no "
                         "samples: nothing to evaluate (more scenes or a larger "
                         "data.val_fraction, then dvc repro cache)")
    size = list(index.get("image_size") or [])
    if len(size) != 2 or any(int(s) % patch for s in size):
        raise ValueError(f"{split_dir / 'index.json'}: cache image size {size} is not a multiple "
                         f"of the student's patch size {patch}: set cache.image_size to "
                         f"multiples of {patch} and rebuild the cache (dvc repro cache)")
    return index


def train_layout_prior(train_dir: Path, val_index: dict, max_samples: Optional[int]
                       ) -> tuple[Optional[np.ndarray], int]:
    """``(prior [H,W] or None, train views used)`` from the ground-truth depth of the train
    split (read with the same reader as the val split). None, with a warning, when no train
    sample has depth. ``ValueError`` if the train split is not from the val split's build."""
    index = read_index(train_dir)
    check_same_build(index, val_index, train_dir.parent)
    depths: list[np.ndarray] = []
    if index["num_samples"]:
        for sample in read_split(train_dir, max_samples):
            if "depth" in sample:
                depths.append(sample["depth"].numpy().astype(np.float64))
    if not depths:
        log.warning("%s: no training sample has ground-truth depth: layout prior skipped",
                    train_dir)
        return None, 0
    return fit_layout_prior(depths), sum(len(d) for d in depths)


def val_batches(val_dir: Path, batch_size: int, max_samples: Optional[int]
                ) -> Iterator[list[dict]]:
    """Decoded val samples in index order, ``batch_size`` at a time, at most ``max_samples``;
    a shard holding fewer samples than ``index.json`` lists is an error, never a short run."""
    batch: list[dict] = []
    for sample in read_split(val_dir, max_samples):
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Predictions and scores
# ---------------------------------------------------------------------------------------------
def predict_batch(model: torch.nn.Module, samples: list[dict], device: torch.device,
                  dtype: torch.dtype) -> tuple[list[dict[str, np.ndarray]], float]:
    """Student maps (numpy float32, no batch axis) of each sample, and the forward seconds."""
    images = torch.stack([s["images"] for s in samples]).to(device)  # [B,N,3,H,W]
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, dtype):
        out = model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    keys = ("xyz_global", "xyz_local", "conf_global", "conf_local")
    arrays = {k: out[k].float().cpu().numpy() for k in keys}
    return [{k: arrays[k][b] for k in keys} for b in range(len(samples))], seconds


def score_inputs(sample: dict) -> dict[str, np.ndarray]:
    """The arrays of a decoded sample that :func:`score_sample` reads, as numpy (what goes to
    a scoring worker process)."""
    return {k: np.asarray(sample[k]) for k in SCORE_KEYS if k in sample}


def teacher_prediction(sample: dict) -> dict[str, np.ndarray]:
    """The cached teacher maps as a prediction; points outside its mask are NaN."""
    mask = np.asarray(sample["mask"])
    pred = {k: np.asarray(sample[k]).astype(np.float64) for k in
            ("xyz_global", "xyz_local", "conf_global", "conf_local")}
    for k in ("xyz_global", "xyz_local"):
        pred[k][~mask] = np.nan
    return pred


def score_sample(sample: dict, student: dict[str, np.ndarray], prior: Optional[np.ndarray],
                 ep: EvalParams) -> dict[str, dict[str, float]]:
    """``{block: metrics}`` of one sample (only ``student_vs_teacher`` without ground truth).
    ``sample``: a decoded cache sample or its :func:`score_inputs`."""
    kw = {"conf_top_fraction": ep.conf_top_fraction, "pnp_reprojection_px":
          ep.pnp_reprojection_px, "max_points": ep.max_points, "seed": ep.seed,
          "conf_percentile": ep.conf_percentile}
    teacher_ref = {k: np.asarray(sample[k]) for k in
                   ("xyz_global", "xyz_local", "mask", "conf_local")}
    scores = {"student_vs_teacher": evaluate_sample(student, teacher_ref, **kw)}
    if not all(k in sample for k in ("depth", "K", "c2w")):
        return scores
    gt = {k: np.asarray(sample[k]).astype(np.float64) for k in ("depth", "K", "c2w")}
    scores["student"] = evaluate_sample(student, gt, **kw)
    scores["teacher"] = evaluate_sample(teacher_prediction(sample), gt, **kw)
    scores["baseline"] = evaluate_sample(plane_baseline(gt["depth"], gt["K"]), gt, **kw)
    if prior is not None:
        scores["layout_prior"] = evaluate_sample(layout_baseline(prior, gt["depth"], gt["K"]),
                                                 gt, **kw)
    return scores


Scored = tuple[str, dict[str, dict[str, float]]]  # (dataset, {block: metrics})


def _score_job(job: tuple) -> Scored:
    dataset, *args = job
    return dataset, score_sample(*args)


def scored_in_order(jobs: Iterable[tuple], workers: int) -> Iterator[Scored]:
    """``(dataset, score_sample(...))`` of every ``(dataset, inputs, student, prior, eval
    params)`` job, in the jobs' order: in this process for ``workers == 1``, else in that many
    worker processes (``spawn``: no torch or OpenMP state is forked), at most ``2 * workers``
    jobs in flight so memory stays bounded. Each sample's scores depend only on the sample and
    ``eval.seed``, so the report is the same for any number of workers."""
    if workers == 1:
        yield from map(_score_job, jobs)
        return
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for job in jobs:
            pending.append(pool.submit(_score_job, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def summarise(scored: list[Scored]) -> dict[str, Any]:
    """Blocks averaged over all samples plus ``per_dataset``; every ground-truth block has the
    same keys (``null`` where no sample has a value) so the report's layout is stable."""
    gt_keys: list[str] = []
    pair_keys: list[str] = []
    for _, scores in scored:
        for block, metrics in scores.items():
            keys = pair_keys if block == "student_vs_teacher" else gt_keys
            keys.extend(k for k in metrics if k not in keys)

    def blocks(items: list[dict[str, dict[str, float]]]) -> dict[str, dict]:
        out = {}
        for block in BLOCKS:
            agg = aggregate_metrics(s[block] for s in items if block in s)
            keys = pair_keys if block == "student_vs_teacher" else gt_keys
            out[block] = {"num_samples": agg["num_samples"], **{k: agg.get(k) for k in keys}}
        return out

    report = blocks([s for _, s in scored])
    datasets = sorted({d for d, _ in scored})
    report["per_dataset"] = {d: blocks([s for name, s in scored if name == d]) for d in datasets}
    return report


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def run_evaluation(params: Params, checkpoint: str | Path, cache_dir: str | Path,
                   out_path: str | Path, progress: bool = True) -> EvalResult:
    """Evaluate the student of ``checkpoint`` on ``<cache_dir>/val`` and write ``out_path``.

    Args:
        params: ``eval`` is used; ``model.name``/``model.head_chunk_size`` check and load the
            checkpoint.
    Raises:
        ValueError: bad params, a missing or mismatching checkpoint, a missing or empty val
            split, or a cache resolution the student cannot take.
    """
    from distill3r.progress import progress_bar

    ep = params.eval
    ep.validate("eval")
    checkpoint, cache_dir, out_path = Path(checkpoint), Path(cache_dir), Path(out_path)
    device = resolve_device(ep.device)
    dtype = resolve_dtype(ep.dtype, device)
    model = load_checked_student(checkpoint, params, device)
    index = check_split(cache_dir / "val", model.patch_size)
    prior, prior_views = train_layout_prior(cache_dir / "train", index,
                                            ep.layout_prior_max_samples)
    total = int(index["num_samples"])
    total = total if ep.max_samples is None else min(total, ep.max_samples)
    scored: list[Scored] = []
    forward_seconds = [0.0]

    def jobs() -> Iterator[tuple]:
        for batch in val_batches(cache_dir / "val", ep.batch_size, ep.max_samples):
            preds, seconds = predict_batch(model, batch, device, dtype)
            forward_seconds[0] += seconds
            for sample, pred in zip(batch, preds):
                dataset = str(sample["meta"].get("dataset", "unknown"))
                yield dataset, score_inputs(sample), pred, prior, ep

    workers = max(1, min(ep.workers or available_cores(), total))
    threads = torch.get_num_threads()
    if workers > 1 and device.type == "cpu":
        # the scoring processes take the cores; a forward with more threads than the cores
        # left spin-waits against them (2 cores, 2 workers: 1.27 s/sample with 2 threads,
        # 0.97 with 1, 1.14 without workers)
        torch.set_num_threads(max(1, available_cores() - workers))
    try:
        with progress_bar(total=total, desc="evaluate", unit="sample",
                          disable=not progress) as bar:
            for item in scored_in_order(jobs(), workers):
                scored.append(item)
                bar.update()
    finally:
        torch.set_num_threads(threads)
    if not scored:
        raise ValueError(f"{cache_dir / 'val'}: the split's shards hold no samples")
    report = summarise(scored)
    report.update({
        "seconds_per_sample": forward_seconds[0] / len(scored), "num_samples": len(scored),
        "num_samples_gt": sum("student" in s for _, s in scored),
        "layout_prior_train_views": prior_views, "checkpoint": checkpoint_fingerprint(checkpoint),
        "model": model.config.name, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "cache_fingerprint": index.get("fingerprint"),
        "height": int(index["image_size"][0]), "width": int(index["image_size"][1]),
        "views_per_sample": index.get("views_per_sample"),
    })
    return EvalResult(write_report(report, out_path), out_path)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_report(report: dict, path: Path) -> dict:
    """Write the cleaned report atomically (temporary file, then rename); return it."""
    report = _clean(report)
    write_json(path, report, allow_nan=False)
    return report


def format_table(report: dict) -> str:
    """A compact text table: one row per block, columns AbsRel, delta1, Chamfer, RRA@15, mAA30
    (PnP poses); ``-`` where undefined."""
    rows = [("", *(c for c, _ in TABLE_COLUMNS), "samples")]
    for block in ("student", "teacher", "baseline", "layout_prior", "student_vs_teacher"):
        metrics = report.get(block) or {}
        cells = ["-" if metrics.get(k) is None else f"{metrics[k]:.4f}" for _, k in TABLE_COLUMNS]
        rows.append((block, *cells, str(metrics.get("num_samples", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)
