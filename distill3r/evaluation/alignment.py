"""Alignment of predicted point maps before scoring (numpy, float64).

Predictions live in view 0's camera frame at an arbitrary scale, so every metric first aligns
them to the reference:

- depth: one scale per view, ``median(reference) / median(prediction)`` on valid pixels;
- point clouds: one weighted sim(3) (Umeyama) fitted on the top ``fraction`` most confident
  valid pixels of all views together, applied to every point;
- local to global: one sim(3) per view taking that view's local point map (its own camera
  frame) onto the global point map (view 0's frame). Its rigid part is the view's pose.

Shapes: point maps ``[N,H,W,3]``, confidences and masks ``[N,H,W]``.
"""

from __future__ import annotations

import numpy as np

from distill3r.geometry import similarity_matrix, transform_points, umeyama


def finite_points(points: np.ndarray) -> np.ndarray:
    """Mask ``[...]`` of points ``[...,3]`` whose three coordinates are finite."""
    return np.isfinite(points).all(axis=-1)


def median_depth_scale(pred_depth: np.ndarray, ref_depth: np.ndarray,
                       valid: np.ndarray) -> np.ndarray:
    """Per-view scale ``median(ref) / median(pred)`` over ``valid`` pixels.

    Args:
        pred_depth, ref_depth: ``[N,H,W]`` z-depths.
        valid: ``[N,H,W]`` bool.
    Returns:
        ``[N]`` float64; NaN for a view without valid pixels or a non-positive median.
    """
    scales = np.full(len(pred_depth), np.nan)
    for i, (p, r, m) in enumerate(zip(pred_depth, ref_depth, valid)):
        m = m & np.isfinite(p)
        if m.any():
            mp = float(np.median(p[m]))
            if mp > 0:
                scales[i] = float(np.median(r[m])) / mp
    return scales


def top_confident(conf: np.ndarray, valid: np.ndarray, fraction: float | None,
                  min_count: int = 3) -> np.ndarray:
    """The ``fraction`` most confident ``valid`` pixels (all views jointly).

    Args:
        conf: ``[...]`` confidences; valid: ``[...]`` bool of the same shape.
        fraction: in (0, 1]; None keeps every valid pixel.
        min_count: keep at least this many pixels (when that many are valid).
    Returns:
        bool mask of the same shape (deterministic for a given input).
    """
    valid = valid & np.isfinite(conf)
    if fraction is None or fraction >= 1:
        return valid.copy()
    if not 0 < fraction:
        raise ValueError(f"conf_top_fraction must be in (0, 1], got {fraction}")
    flat_idx = np.flatnonzero(valid)
    k = min(len(flat_idx), max(min_count, int(np.ceil(fraction * len(flat_idx)))))
    out = np.zeros(valid.size, dtype=bool)
    if k > 0:
        values = conf.reshape(-1)[flat_idx]
        best = np.argpartition(-values, k - 1)[:k] if k < len(values) else np.arange(k)
        out[flat_idx[best]] = True
    return out.reshape(valid.shape)


def fit_sim3(src: np.ndarray, dst: np.ndarray, conf: np.ndarray, valid: np.ndarray,
             fraction: float | None = 0.15, weighted: bool = True,
             with_scale: bool = True) -> np.ndarray:
    """4x4 similarity ``T`` with ``dst ~ T(src)`` on the top confident pixels.

    Args:
        src, dst: ``[...,3]`` corresponding points (e.g. ``[N,H,W,3]``).
        conf: ``[...]`` confidence of ``src`` (weights when ``weighted``).
        valid: ``[...]`` bool; pixels whose ``src`` or ``dst`` is not finite are dropped.
        fraction: share of valid pixels used (None: all).
    Raises:
        ValueError: fewer than 3 usable pixels.
    """
    valid = valid & finite_points(src) & finite_points(dst)
    sel = top_confident(conf, valid, fraction)
    if sel.sum() < 3:
        raise ValueError(f"alignment needs at least 3 valid pixels, got {int(sel.sum())}")
    w = np.maximum(conf[sel].astype(np.float64), 0.0) if weighted else None
    if w is not None and w.sum() <= 0:
        w = None
    s, R, t = umeyama(src[sel], dst[sel], w, with_scale=with_scale)
    return similarity_matrix(s, R, t)


def align_to_reference(pred: np.ndarray, ref: np.ndarray, conf: np.ndarray, valid: np.ndarray,
                       fraction: float | None = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """One weighted sim(3) of predicted points onto reference points, applied to all points.

    Args:
        pred, ref: ``[N,H,W,3]`` predicted and reference points (pixel-aligned).
        conf: ``[N,H,W]`` prediction confidence; valid: ``[N,H,W]`` reference validity.
        fraction: the top confident share of valid pixels used for the fit (Fast3R: 0.15).
    Returns:
        ``(aligned [N,H,W,3] float64, T [4,4])`` with ``aligned = T(pred)``.
    """
    T = fit_sim3(pred, ref, conf, valid, fraction)
    return transform_points(T, np.asarray(pred, np.float64)), T


def local_to_global(local: np.ndarray, global_: np.ndarray, conf: np.ndarray,
                    valid: np.ndarray | None = None, fraction: float | None = None,
                    with_scale: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-view sim(3) taking each local point map onto the global one.

    Args:
        local: ``[N,H,W,3]`` points in each view's camera frame.
        global_: ``[N,H,W,3]`` the same pixels in view 0's frame.
        conf: ``[N,H,W]`` weights (e.g. the local confidence).
        valid: ``[N,H,W]`` optional mask; fraction: per-view top confident share (None: all).
    Returns:
        ``(aligned [N,H,W,3], T [N,4,4], ok [N] bool)``: ``aligned[i] = T[i](local[i])``. A
        view whose fit fails (fewer than 3 usable pixels) gets ``T = I``, NaN points, not ok.
    """
    if valid is None:
        valid = np.ones(local.shape[:-1], dtype=bool)
    aligned = np.full(local.shape, np.nan)
    Ts = np.tile(np.eye(4), (len(local), 1, 1))
    ok = np.zeros(len(local), dtype=bool)
    for i in range(len(local)):
        try:
            Ts[i] = fit_sim3(local[i], global_[i], conf[i], valid[i], fraction,
                             with_scale=with_scale)
        except ValueError:
            continue
        aligned[i] = transform_points(Ts[i], np.asarray(local[i], np.float64))
        ok[i] = True
    return aligned, Ts, ok
