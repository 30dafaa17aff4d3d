"""Depth and reconstruction metrics (numpy + scipy KD-trees).

- Depth (from the z of local point maps): per-view median scaling, then AbsRel
  ``mean(|d - d*| / d*)`` and ``delta1`` = share of pixels with ``max(d/d*, d*/d) < 1.25``,
  averaged over views. Only valid reference pixels count.
- Reconstruction (after alignment, see ``alignment.py``): Accuracy = distance of each predicted
  point to its nearest reference point, Completeness = reference to nearest predicted point
  (mean and median of each), Chamfer = (mean Accuracy + mean Completeness) / 2, normal
  consistency = mean ``|cos|`` between a point's normal and its nearest neighbour's normal,
  averaged over both directions. Normals come from the point-map grid (cross product of the
  horizontal and vertical neighbour differences).
Distances are in the reference's units (metres for ground truth).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from distill3r.evaluation.alignment import median_depth_scale


def subsample_indices(count: int, max_points: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` out of ``count``, deterministic for ``seed``."""
    if max_points is None or count <= max_points:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=max_points, replace=False))


def depth_metrics(pred_depth: np.ndarray, ref_depth: np.ndarray,
                  valid: np.ndarray | None = None) -> dict[str, float]:
    """AbsRel and delta<1.25 after per-view median scaling.

    Args:
        pred_depth, ref_depth: ``[N,H,W]`` z-depths; valid: ``[N,H,W]`` (default ``ref > 0``).
    Returns:
        ``{"abs_rel", "delta1"}`` averaged over views with valid pixels (NaN if none).
        Non-positive predicted depths count as failures for ``delta1``.
    """
    pred_depth = np.asarray(pred_depth, np.float64)
    ref_depth = np.asarray(ref_depth, np.float64)
    if pred_depth.shape != ref_depth.shape:
        raise ValueError(f"depth shapes differ: {pred_depth.shape} vs {ref_depth.shape}")
    if valid is None:
        valid = ref_depth > 0
    valid = valid & (ref_depth > 0) & np.isfinite(ref_depth) & np.isfinite(pred_depth)
    abs_rel, delta1 = [], []
    for p, r, m, s in zip(pred_depth, ref_depth, valid,
                          median_depth_scale(pred_depth, ref_depth, valid)):
        if not np.isfinite(s):
            continue
        p, r = s * p[m], r[m]
        abs_rel.append(float(np.mean(np.abs(p - r) / r)))
        with np.errstate(divide="ignore"):
            ratio = np.where(p > 0, np.maximum(p / r, r / np.where(p > 0, p, 1.0)), np.inf)
        delta1.append(float(np.mean(ratio < 1.25)))
    if not abs_rel:
        return {"abs_rel": float("nan"), "delta1": float("nan")}
    return {"abs_rel": float(np.mean(abs_rel)), "delta1": float(np.mean(delta1))}


def grid_normals(points: np.ndarray, valid: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals of point maps from central differences of grid neighbours.

    Args:
        points: ``[...,H,W,3]``; valid: ``[...,H,W]`` bool (default: finite points).
    Returns:
        ``(normals [...,H,W,3], ok [...,H,W])``; border pixels, pixels with an invalid
        neighbour and degenerate (zero-area) neighbourhoods are not ok (normal = 0).
    """
    points = np.asarray(points, np.float64)
    ok_pts = np.isfinite(points).all(-1)
    if valid is not None:
        ok_pts &= valid
    normals = np.zeros(points.shape)
    ok = np.zeros(points.shape[:-1], dtype=bool)
    dx = points[..., 1:-1, 2:, :] - points[..., 1:-1, :-2, :]
    dy = points[..., 2:, 1:-1, :] - points[..., :-2, 1:-1, :]
    inner_ok = (ok_pts[..., 1:-1, 2:] & ok_pts[..., 1:-1, :-2] & ok_pts[..., 2:, 1:-1]
                & ok_pts[..., :-2, 1:-1] & ok_pts[..., 1:-1, 1:-1])
    with np.errstate(invalid="ignore"):
        n = np.cross(dx, dy)
        norm = np.linalg.norm(n, axis=-1)
        inner_ok &= np.isfinite(norm) & (norm > 1e-12)
        n = np.where(inner_ok[..., None], n / np.where(inner_ok, norm, 1.0)[..., None], 0.0)
    normals[..., 1:-1, 1:-1, :] = n
    ok[..., 1:-1, 1:-1] = inner_ok
    return normals, ok


def cloud_metrics(pred: np.ndarray, ref: np.ndarray, pred_normals: np.ndarray | None = None,
                  ref_normals: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy / Completeness / Chamfer (/ normal consistency) of two point clouds.

    Args:
        pred: ``[M,3]``; ref: ``[K,3]``, both finite, in the same frame and units.
        pred_normals, ref_normals: ``[M,3]`` / ``[K,3]`` unit normals; rows that are all zero
            (or NaN) are ignored for normal consistency. Both or neither.
    Returns:
        ``acc_mean, acc_median, comp_mean, comp_median, chamfer`` and, with normals,
        ``nc_acc, nc_comp, nc``.

    The nearest-neighbour queries use every core (exact, so the result does not depend on it).
    """
    pred = np.asarray(pred, np.float64).reshape(-1, 3)
    ref = np.asarray(ref, np.float64).reshape(-1, 3)
    if len(pred) == 0 or len(ref) == 0:
        raise ValueError(f"cloud_metrics needs non-empty clouds, got {len(pred)} and {len(ref)}")
    d_acc, i_acc = cKDTree(ref).query(pred, k=1, workers=-1)
    d_comp, i_comp = cKDTree(pred).query(ref, k=1, workers=-1)
    out = {"acc_mean": float(d_acc.mean()), "acc_median": float(np.median(d_acc)),
           "comp_mean": float(d_comp.mean()), "comp_median": float(np.median(d_comp))}
    out["chamfer"] = 0.5 * (out["acc_mean"] + out["comp_mean"])
    if (pred_normals is None) != (ref_normals is None):
        raise ValueError("cloud_metrics: give normals for both clouds or for neither")
    if pred_normals is not None:
        out["nc_acc"] = _mean_abs_cos(pred_normals, ref_normals[i_acc])
        out["nc_comp"] = _mean_abs_cos(ref_normals, pred_normals[i_comp])
        out["nc"] = float(np.nanmean([out["nc_acc"], out["nc_comp"]])) \
            if np.isfinite([out["nc_acc"], out["nc_comp"]]).any() else float("nan")
    return out


def _mean_abs_cos(a: np.ndarray, b: np.ndarray) -> float:
    """Mean ``|a . b|`` over rows where both unit vectors are usable (NaN if none)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    ok &= (np.abs(a).sum(1) > 0) & (np.abs(b).sum(1) > 0)
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs((a[ok] * b[ok]).sum(1))))


def point_map_metrics(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray,
                      max_points: int | None = 20000, seed: int = 0,
                      normals: bool = True) -> dict[str, float]:
    """Reconstruction metrics of pixel-aligned point maps (already aligned to ``ref``).

    Args:
        pred, ref: ``[N,H,W,3]``; valid: ``[N,H,W]`` reference validity (pixels whose
            prediction is not finite are dropped).
        max_points: pixels kept for the KD-tree metrics (the same pixels in both clouds,
            chosen deterministically with ``seed``); None keeps all.
        normals: also compute normal consistency (normals from each grid before sampling).
    Returns:
        see :func:`cloud_metrics`; every value NaN when no pixel is usable.
    """
    pred = np.asarray(pred, np.float64)
    ref = np.asarray(ref, np.float64)
    if pred.shape != ref.shape or pred.shape[:-1] != valid.shape:
        raise ValueError(f"point map shapes differ: {pred.shape}, {ref.shape}, {valid.shape}")
    use = valid & np.isfinite(pred).all(-1) & np.isfinite(ref).all(-1)
    keys = ["acc_mean", "acc_median", "comp_mean", "comp_median", "chamfer"]
    if normals:
        keys += ["nc_acc", "nc_comp", "nc"]
    if not use.any():
        return {k: float("nan") for k in keys}
    flat = np.flatnonzero(use)[subsample_indices(int(use.sum()), max_points, seed)]
    p = pred.reshape(-1, 3)[flat]
    r = ref.reshape(-1, 3)[flat]
    if not normals:
        return cloud_metrics(p, r)
    pn, _ = grid_normals(pred, use)
    rn, _ = grid_normals(ref, use)
    return cloud_metrics(p, r, pn.reshape(-1, 3)[flat], rn.reshape(-1, 3)[flat])
