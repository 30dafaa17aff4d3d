"""Trivial baselines that any trained student must beat.

Both produce the same dict as a model prediction (``xyz_global``, ``xyz_local`` [N,H,W,3],
``conf_global``, ``conf_local`` [N,H,W], all views with the identity pose, so global == local)
and are scored with :func:`distill3r.evaluation.protocol.evaluate_sample`.

- ``plane``: every view is a fronto-parallel plane at the median of its reference depth (a
  scale oracle: the prediction is given the true depth scale).
- ``layout``: a per-pixel layout prior, the mean over training views of
  ``depth / median(depth)``, scaled by each view's reference median depth (same oracle).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from distill3r.geometry import depth_to_camera_points

BASELINES = ("plane", "layout")


def _median_depths(depth: np.ndarray) -> np.ndarray:
    """Median of the valid (``> 0``) depths of each view ``[N,H,W]`` -> ``[N]`` (NaN if none)."""
    out = np.full(len(depth), np.nan)
    for i, d in enumerate(depth):
        ok = np.isfinite(d) & (d > 0)
        if ok.any():
            out[i] = float(np.median(d[ok]))
    return out


def _as_prediction(depth: np.ndarray, K: np.ndarray) -> dict[str, np.ndarray]:
    """Point maps of per-view depth ``[N,H,W]`` with intrinsics ``K`` ``[N,3,3]``, identity
    poses and unit confidence."""
    K = np.broadcast_to(np.asarray(K, np.float64), (len(depth), 3, 3))
    local = np.stack([depth_to_camera_points(d, k) for d, k in zip(depth, K)])
    conf = np.ones(depth.shape)
    return {"xyz_global": local.copy(), "xyz_local": local, "conf_global": conf,
            "conf_local": conf.copy()}


def plane_baseline(ref_depth: np.ndarray, K: np.ndarray) -> dict[str, np.ndarray]:
    """Fronto-parallel planes at each view's median reference depth.

    Args:
        ref_depth: ``[N,H,W]`` reference depth (0 invalid); K: ``[N,3,3]`` or ``[3,3]``.
    """
    med = _median_depths(np.asarray(ref_depth, np.float64))
    depth = np.broadcast_to(med[:, None, None], ref_depth.shape).copy()
    return _as_prediction(depth, K)


def fit_layout_prior(depths: Iterable[np.ndarray]) -> np.ndarray:
    """Per-pixel mean of ``depth / median(depth)`` over training depth maps.

    Args:
        depths: iterable of ``[H,W]`` (or ``[N,H,W]``) depth maps of one size, 0 = invalid.
    Returns:
        ``[H,W]`` float64 prior; pixels never valid get 1.0.
    Raises:
        ValueError: no depth maps, or maps of different sizes.
    """
    total = count = None
    for d in depths:
        d = np.asarray(d, np.float64)
        for view in d.reshape((-1,) + d.shape[-2:]):
            if total is None:
                total, count = np.zeros(view.shape), np.zeros(view.shape)
            elif view.shape != total.shape:
                raise ValueError(f"layout prior: depth maps differ in size: {view.shape} vs "
                                 f"{total.shape}")
            ok = np.isfinite(view) & (view > 0)
            if not ok.any():
                continue
            total[ok] += view[ok] / np.median(view[ok])
            count[ok] += 1
    if total is None:
        raise ValueError("layout prior: no depth maps given")
    return np.where(count > 0, total / np.maximum(count, 1), 1.0)


def layout_baseline(prior: np.ndarray, ref_depth: np.ndarray, K: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """The layout prior ``[H,W]`` times each view's median reference depth ``[N,H,W]``."""
    prior = np.asarray(prior, np.float64)
    if prior.shape != ref_depth.shape[1:]:
        raise ValueError(f"layout prior is {prior.shape} but the depth maps are "
                         f"{ref_depth.shape[1:]}")
    med = _median_depths(np.asarray(ref_depth, np.float64))
    return _as_prediction(prior[None] * med[:, None, None], K)
