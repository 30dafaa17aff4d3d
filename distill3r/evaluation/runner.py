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
all pixels. The report (``eval.json``) holds each block averaged over samples
(:func:`aggregate_metrics`; ``num_samples`` per block, ``null`` where undefined), the same per
dataset under ``per_dataset``, ``seconds_per_sample`` (model forward only), ``num_samples`` and
the checkpoint fingerprint. With a run reference (written by the train stage) the numeric
values are also logged to that MLflow run as ``eval.<block>.<metric>``; an unreachable store
only warns (``eval.json`` is written first).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from distill3r.cache.reader import cache_dataset, read_index
from distill3r.config import EvalParams, Params
from distill3r.devices import autocast, resolve_device, resolve_dtype
from distill3r.evaluation.baselines import fit_layout_prior, layout_baseline, plane_baseline
from distill3r.evaluation.protocol import aggregate_metrics, evaluate_sample
from distill3r.inference import checkpoint_fingerprint
from distill3r.jsonio import write_json
from distill3r.tracking import RunRef, log_metrics, read_run_ref, start_run

log = logging.getLogger(__name__)

GT_BLOCKS = ("student", "teacher", "baseline", "layout_prior")
BLOCKS = ("student", "teacher", "student_vs_teacher", "baseline", "layout_prior")
TABLE_COLUMNS = (("AbsRel", "depth_abs_rel"), ("delta1", "depth_delta1"),
                 ("Chamfer", "chamfer"), ("RRA@15", "pnp_rra_15"), ("mAA30", "pnp_maa_30"))
# Fail fast when the tracking server is down (MLflow's defaults retry for minutes).
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@dataclass
class EvalResult:
    """What :func:`run_evaluation` produced: the report (as written), its path, and the MLflow
    run the metrics went to (None: no run reference, or the store was unreachable)."""

    report: dict
    out_path: Path
    logged_run_id: Optional[str]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def load_checked_student(checkpoint: Path, params: Params, device: torch.device):
    """The student in eval mode; ``ValueError`` if the folder is missing or unreadable, or its
    architecture differs from ``model.name`` in params (a checkpoint of another config)."""
    from distill3r.models import get_config, load_student  # lazy: timm is slow to import

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


def train_layout_prior(train_dir: Path, image_size: list[int], max_samples: Optional[int]
                       ) -> tuple[Optional[np.ndarray], int]:
    """``(prior [H,W] or None, train views used)`` from the ground-truth depth of the train
    split (only ``gt.npz`` is decoded). None, with a warning, when no train sample has depth."""
    index = read_index(train_dir)
    if list(index.get("image_size") or []) != list(image_size):
        raise ValueError(f"{train_dir / 'index.json'}: train image size {index.get('image_size')}"
                         f" differs from the val split's {image_size}: rebuild the cache")
    depths: list[np.ndarray] = []
    if index["shards"]:
        for count, raw in enumerate(cache_dataset(train_dir, shuffle=False, seed=0, decode=False)):
            if max_samples is not None and count >= max_samples:
                break
            if "gt.npz" in raw:
                depths.append(_gt_depth(raw))
    if not depths:
        log.warning("%s: no training sample has ground-truth depth: layout prior skipped",
                    train_dir)
        return None, 0
    return fit_layout_prior(depths), sum(len(d) for d in depths)


def _gt_depth(raw: dict) -> np.ndarray:
    where = f"{raw.get('__url__')}: sample {raw.get('__key__')}"
    try:
        with np.load(io.BytesIO(bytes(raw["gt.npz"])), allow_pickle=False) as z:
            return np.asarray(z["depth"], np.float64)
    except (ValueError, OSError, KeyError) as exc:
        raise ValueError(f"{where}: gt.npz has no readable depth: {exc}") from exc


def val_batches(val_dir: Path, batch_size: int, max_samples: Optional[int]
                ) -> Iterator[list[dict]]:
    """Decoded val samples in index order, ``batch_size`` at a time, at most ``max_samples``."""
    batch: list[dict] = []
    for count, sample in enumerate(cache_dataset(val_dir, shuffle=False, seed=0)):
        if max_samples is not None and count >= max_samples:
            break
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


def teacher_prediction(sample: dict) -> dict[str, np.ndarray]:
    """The cached teacher maps as a prediction; points outside its mask are NaN."""
    mask = sample["mask"].numpy()
    pred = {k: sample[k].numpy().astype(np.float64) for k in
            ("xyz_global", "xyz_local", "conf_global", "conf_local")}
    for k in ("xyz_global", "xyz_local"):
        pred[k][~mask] = np.nan
    return pred


def score_sample(sample: dict, student: dict[str, np.ndarray], prior: Optional[np.ndarray],
                 ep: EvalParams) -> dict[str, dict[str, float]]:
    """``{block: metrics}`` of one sample (only ``student_vs_teacher`` without ground truth)."""
    kw = {"conf_top_fraction": ep.conf_top_fraction, "pnp_reprojection_px":
          ep.pnp_reprojection_px, "max_points": ep.max_points, "seed": ep.seed}
    teacher_ref = {"xyz_global": sample["xyz_global"].numpy(),
                   "xyz_local": sample["xyz_local"].numpy(), "mask": sample["mask"].numpy(),
                   "conf_local": sample["conf_local"].numpy()}
    scores = {"student_vs_teacher": evaluate_sample(student, teacher_ref, **kw)}
    if not all(k in sample for k in ("depth", "K", "c2w")):
        return scores
    gt = {k: sample[k].numpy().astype(np.float64) for k in ("depth", "K", "c2w")}
    scores["student"] = evaluate_sample(student, gt, **kw)
    scores["teacher"] = evaluate_sample(teacher_prediction(sample), gt, **kw)
    scores["baseline"] = evaluate_sample(plane_baseline(gt["depth"], gt["K"]), gt, **kw)
    if prior is not None:
        scores["layout_prior"] = evaluate_sample(layout_baseline(prior, gt["depth"], gt["K"]),
                                                 gt, **kw)
    return scores


def summarise(scored: list[tuple[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
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
                   out_path: str | Path, run_ref: str | Path | None = None,
                   progress: bool = True) -> EvalResult:
    """Evaluate the student of ``checkpoint`` on ``<cache_dir>/val`` and write ``out_path``.

    Args:
        params: ``eval`` is used; ``model.name``/``model.head_chunk_size`` check and load the
            checkpoint.
        run_ref: the train stage's run reference JSON; when the file exists the metrics are
            logged to that run (a malformed file is a ``ValueError``; a missing one is skipped).
    Raises:
        ValueError: bad params, a missing or mismatching checkpoint, a missing or empty val
            split, or a cache resolution the student cannot take.
    """
    from tqdm import tqdm

    ep = params.eval
    ep.validate("eval")
    checkpoint, cache_dir, out_path = Path(checkpoint), Path(cache_dir), Path(out_path)
    ref = read_run_ref(run_ref) if run_ref is not None and Path(run_ref).is_file() else None
    if run_ref is not None and ref is None:
        log.info("%s not found: metrics are not logged to MLflow", run_ref)
    device = resolve_device(ep.device)
    dtype = resolve_dtype(ep.dtype, device)
    model = load_checked_student(checkpoint, params, device)
    index = check_split(cache_dir / "val", model.patch_size)
    prior, prior_views = train_layout_prior(cache_dir / "train", index["image_size"],
                                            ep.layout_prior_max_samples)
    total = int(index["num_samples"])
    total = total if ep.max_samples is None else min(total, ep.max_samples)
    scored: list[tuple[str, dict[str, dict[str, float]]]] = []
    forward_seconds = 0.0
    with tqdm(total=total, desc="evaluate", unit="sample", disable=not progress) as bar:
        for batch in val_batches(cache_dir / "val", ep.batch_size, ep.max_samples):
            preds, seconds = predict_batch(model, batch, device, dtype)
            forward_seconds += seconds
            for sample, pred in zip(batch, preds):
                dataset = str(sample["meta"].get("dataset", "unknown"))
                scored.append((dataset, score_sample(sample, pred, prior, ep)))
                bar.update()
    if not scored:
        raise ValueError(f"{cache_dir / 'val'}: the split's shards hold no samples")
    report = summarise(scored)
    report.update({
        "seconds_per_sample": forward_seconds / len(scored), "num_samples": len(scored),
        "num_samples_gt": sum("student" in s for _, s in scored),
        "layout_prior_train_views": prior_views, "checkpoint": checkpoint_fingerprint(checkpoint),
        "model": model.config.name, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "cache_fingerprint": index.get("fingerprint"),
        "height": int(index["image_size"][0]), "width": int(index["image_size"][1]),
        "views_per_sample": index.get("views_per_sample"),
    })
    report = write_report(report, out_path)
    logged = log_report(report, ref) if ref is not None else None
    return EvalResult(report, out_path, logged)


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


def mlflow_metrics(report: dict, prefix: str = "eval") -> dict[str, float]:
    """Numeric leaves of the report as ``{"eval.student.depth_abs_rel": v, ...}`` (nulls,
    strings and booleans dropped; characters MLflow refuses in names become ``_``)."""
    out: dict[str, float] = {}

    def walk(node: Any, name: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{re.sub(r'[^A-Za-z0-9_./ -]', '_', str(k))}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool) \
                and math.isfinite(node):
            out[name] = float(node)

    walk(report, prefix)
    return out


@contextlib.contextmanager
def _fast_failing_http() -> Iterator[None]:
    added = [k for k in MLFLOW_HTTP_DEFAULTS if k not in os.environ]
    os.environ.update({k: MLFLOW_HTTP_DEFAULTS[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def log_report(report: dict, ref: RunRef) -> Optional[str]:
    """Log the report's metrics to the run of ``ref``; the run id, or None (with a warning)
    when the store cannot be reached or refuses the run."""
    metrics = mlflow_metrics(report)
    try:
        with _fast_failing_http(), start_run(None, ref.tracking_uri, run_id=ref.run_id,
                                             system_metrics=False):
            log_metrics(metrics)
    except Exception as exc:  # noqa: BLE001 -- any store failure (HTTP, SQL, auth) only warns
        log.warning("MLflow logging to run %s at %s failed (%s: %s); eval.json is written "
                    "anyway", ref.run_id, ref.tracking_uri, type(exc).__name__, exc)
        return None
    log.info("logged %d metrics to MLflow run %s", len(metrics), ref.run_id)
    return ref.run_id


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
