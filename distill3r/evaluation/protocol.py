"""Scoring one multi-view sample, and averaging over samples (the Fast3R protocol).

A prediction is a dict of arrays (numpy, or CPU tensors) ``xyz_global``, ``xyz_local``
``[N,H,W,3]`` and ``conf_global``, ``conf_local`` ``[N,H,W]`` of one sample (no batch axis).
A reference is either ground truth (``depth [N,H,W]`` with 0 invalid, ``K [N,3,3]``,
``c2w [N,4,4]``) or teacher maps (``xyz_global``, ``xyz_local`` [N,H,W,3], ``mask`` [N,H,W],
optionally ``conf_local``); teacher poses are then the Procrustes poses of the teacher maps.

Metric keys (flat; distances in reference units, shares as fractions):
``depth_abs_rel, depth_delta1`` (local z, per-view median scaling);
``acc_mean, acc_median, comp_mean, comp_median, chamfer, nc_acc, nc_comp, nc`` (local points
aligned to the global map per view, then one weighted sim(3) to the reference on the top
``conf_top_fraction`` confident pixels); ``global_head_chamfer`` (the same for the global map
alone); ``focal_rel_err`` (ground truth only); ``pnp_{rot_err, trans_err, rra_5, rra_15,
rta_5, rta_15, maa_30}``: the poses inference writes (:func:`estimate_cameras` on the pixels
at or above the ``conf_percentile`` of local confidence: view 0 the identity, PnP, Procrustes
where PnP fails; ``pnp_failed_views`` counts those); ``procrustes_*``: the same metrics of
Procrustes poses for every view (local onto global, top ``conf_top_fraction`` pixels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from distill3r.evaluation.alignment import align_to_reference, finite_points, local_to_global
from distill3r.evaluation.metrics import depth_metrics, point_map_metrics
from distill3r.evaluation.poses import (confident_pixels, estimate_cameras, pose_metrics,
                                        procrustes_poses, relative_pose_errors)
from distill3r.geometry import depth_to_camera_points, relative_poses, transform_points

PRED_KEYS = ("xyz_global", "xyz_local", "conf_global", "conf_local")


def _array(d: Mapping[str, Any], key: str, what: str) -> np.ndarray:
    if key not in d:
        raise ValueError(f"{what} is missing {key!r} (has: {', '.join(sorted(d))})")
    return np.asarray(d[key], dtype=np.float64)


def reference_from_gt(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> dict[str, np.ndarray]:
    """Reference point maps from ground truth.

    Args:
        depth: ``[N,H,W]`` metres (0 invalid); K: ``[N,3,3]``; c2w: ``[N,4,4]`` any world frame.
    Returns:
        ``xyz_local, xyz_global [N,H,W,3]`` (global = view 0's camera frame), ``valid [N,H,W]``,
        ``c2w [N,4,4]`` relative to view 0, ``K [N,3,3]``.
    """
    depth = np.asarray(depth, np.float64)
    K = np.asarray(K, np.float64)
    rel = relative_poses(np.asarray(c2w, np.float64))
    local = np.stack([depth_to_camera_points(d, k) for d, k in zip(depth, K)])
    glob = np.stack([transform_points(T, p) for T, p in zip(rel, local)])
    valid = np.isfinite(depth) & (depth > 0)
    return {"xyz_local": local, "xyz_global": glob, "valid": valid, "c2w": rel, "K": K}


def reference_from_teacher(xyz_global: np.ndarray, xyz_local: np.ndarray, mask: np.ndarray,
                           conf_local: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Reference from teacher point maps ``[N,H,W,3]`` and validity ``mask [N,H,W]``; poses
    are the Procrustes poses of local onto global (weighted by ``conf_local`` if given)."""
    glob = np.asarray(xyz_global, np.float64)
    local = np.asarray(xyz_local, np.float64)
    valid = np.asarray(mask, bool) & finite_points(glob) & finite_points(local)
    conf = np.ones(valid.shape) if conf_local is None else np.asarray(conf_local, np.float64)
    c2w, _ = procrustes_poses(local, glob, conf, valid)
    return {"xyz_local": local, "xyz_global": glob, "valid": valid, "c2w": c2w}


def make_reference(ref: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Dispatch on the keys present: ground truth (depth, K, c2w) or teacher maps."""
    if all(k in ref for k in ("depth", "K", "c2w")):
        return reference_from_gt(ref["depth"], ref["K"], ref["c2w"])
    if all(k in ref for k in ("xyz_global", "xyz_local", "mask")):
        return reference_from_teacher(ref["xyz_global"], ref["xyz_local"], ref["mask"],
                                      ref.get("conf_local"))
    raise ValueError("reference needs either depth, K and c2w (ground truth) or xyz_global, "
                     f"xyz_local and mask (teacher); got keys {', '.join(sorted(ref))}")


def _recon_metrics(points: np.ndarray, conf: np.ndarray, ref: dict[str, np.ndarray],
                   fraction: float, max_points: int | None, seed: int) -> dict[str, float]:
    """Align ``points [N,H,W,3]`` to the reference (sim(3), top confident) and score them."""
    valid = ref["valid"] & finite_points(points)
    try:
        aligned, _ = align_to_reference(points, ref["xyz_global"], conf, valid, fraction)
    except ValueError:
        aligned = np.full(points.shape, np.nan)
    return point_map_metrics(aligned, ref["xyz_global"], ref["valid"], max_points, seed)


def _pose_block(prefix: str, c2w: np.ndarray, ref_c2w: np.ndarray) -> dict[str, float]:
    rot, trans = relative_pose_errors(c2w, ref_c2w)
    return {f"{prefix}_{k}": v for k, v in pose_metrics(rot, trans).items()}


def evaluate_sample(pred: Mapping[str, Any], ref: Mapping[str, Any],
                    conf_top_fraction: float = 0.15, pnp_reprojection_px: float = 5.0,
                    max_points: int | None = 20000, seed: int = 0,
                    conf_percentile: float = 10.0) -> dict[str, float]:
    """All metrics of one sample as a flat ``{name: float}`` (NaN where undefined, e.g. pose
    metrics of a single view). See the module docstring for the keys and the protocol."""
    P = {k: _array(pred, k, "prediction") for k in PRED_KEYS}
    R = make_reference(ref)
    if P["xyz_global"].shape != R["xyz_global"].shape:
        raise ValueError(f"prediction {P['xyz_global'].shape} and reference "
                         f"{R['xyz_global'].shape} point maps differ in shape")
    out: dict[str, float] = {}
    d = depth_metrics(P["xyz_local"][..., 2], R["xyz_local"][..., 2], R["valid"])
    out.update({f"depth_{k}": v for k, v in d.items()})

    local_aligned, _, _ = local_to_global(P["xyz_local"], P["xyz_global"], P["conf_local"],
                                          None, conf_top_fraction)
    out.update(_recon_metrics(local_aligned, P["conf_local"], R, conf_top_fraction,
                              max_points, seed))
    out["global_head_chamfer"] = _recon_metrics(P["xyz_global"], P["conf_global"], R,
                                                conf_top_fraction, max_points, seed)["chamfer"]

    keep, _ = confident_pixels(P["xyz_global"], P["conf_local"], conf_percentile)
    cams = estimate_cameras(P, keep, pnp_reprojection_px, seed)
    if "K" in R:
        f_ref = 0.5 * (R["K"][0, 0, 0] + R["K"][0, 1, 1])
        out["focal_rel_err"] = float(abs(cams.focal - f_ref) / f_ref)
    out.update(_pose_block("pnp", cams.c2w, R["c2w"]))
    out["pnp_failed_views"] = float(cams.pnp_failed)
    c2w_pro, _ = procrustes_poses(P["xyz_local"], P["xyz_global"], P["conf_local"], None,
                                  conf_top_fraction)
    out.update(_pose_block("procrustes", c2w_pro, R["c2w"]))
    return out


def aggregate_metrics(samples: Iterable[Mapping[str, float]]) -> dict[str, float | int | None]:
    """Mean of every metric over samples, ignoring NaN; None where no sample has a value.
    Adds ``num_samples``. Keys keep their first-seen order."""
    values: dict[str, list[float]] = {}
    count = 0
    for sample in samples:
        count += 1
        for k, v in sample.items():
            values.setdefault(k, []).append(float(v))
    out: dict[str, float | int | None] = {"num_samples": count}
    for k, vs in values.items():
        finite = [v for v in vs if math.isfinite(v)]
        out[k] = float(np.mean(finite)) if finite else None
    return out
