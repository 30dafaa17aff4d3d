"""Camera poses from predicted point maps, and pose metrics.

:func:`estimate_cameras` is the one recipe that inference writes to ``cameras.json`` and that
evaluation scores: the pixels kept are those whose local confidence is at or above a percentile
(:func:`confident_pixels`, the points inference exports); a shared focal from view 0's kept
global points; view 0's pose is the identity (the global frame is view 0's camera frame by
construction); every other view by PnP, and by Procrustes where PnP fails.

Two estimators (both return camera-to-world 4x4 poses in view 0's frame, at the prediction's
scale):

- PnP (the Fast3R protocol): a shared focal length from view 0's global points (robust
  Weiszfeld fit, principal point at the image centre ``((W-1)/2, (H-1)/2)``), then per view
  ``cv2.solvePnPRansac`` (SQPnP) between the global points and their pixels.
- Procrustes: per view, the sim(3) from the local point map onto the global one; its rotation
  and translation are the pose (its scale is dropped).

Metrics over all view pairs ``i < j`` of the relative pose ``inv(c2w_i) @ c2w_j``: rotation
error (degrees of ``R_pred^T R_ref``), translation direction error (the angle between the
lines of the two translation vectors, ``acos(|cos|)`` in [0, 90]: scale-free and blind to the
sign, as in Fast3R's evaluation, facebookresearch/fast3r ``src/eval/cam_pose_metric.py``
``compare_translation_by_angle``, adapted from PoseDiffusion), RRA@t / RTA@t = share of pairs
under t degrees, and mAA(30) = mean over thresholds 1..30 degrees of the share with
``max(rot, trans) < t`` (PoseDiffusion's ``calculate_auc_np``). Shares are fractions in
[0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from distill3r.evaluation.alignment import finite_points, local_to_global
from distill3r.evaluation.metrics import subsample_indices
from distill3r.geometry import invert_pose, pixel_grid

log = logging.getLogger(__name__)


def principal_point(height: int, width: int) -> tuple[float, float]:
    """Image centre with pixel centres at integer coordinates."""
    return (width - 1) / 2.0, (height - 1) / 2.0


def estimate_focal(points: np.ndarray, valid: np.ndarray | None = None, iterations: int = 10,
                   min_depth: float = 1e-6) -> float:
    """Focal length (pixels) of a camera from its own point map ``[H,W,3]``.

    Minimises ``sum |(u - cx, v - cy) - f (x/z, y/z)|`` (an L1 of 2-D residuals) by Weiszfeld
    iterations started from the least-squares solution. Points behind the camera are ignored.
    Raises ``ValueError`` if fewer than 2 usable pixels.
    """
    H, W = points.shape[:2]
    u, v = pixel_grid(H, W)
    cx, cy = principal_point(H, W)
    pts = np.asarray(points, np.float64)
    use = finite_points(pts) & (pts[..., 2] > min_depth)
    if valid is not None:
        use &= valid
    if use.sum() < 2:
        raise ValueError("estimate_focal: fewer than 2 points in front of the camera")
    p = np.stack([u[use] - cx, v[use] - cy], axis=1)
    q = pts[use][:, :2] / pts[use][:, 2:3]
    w = np.ones(len(p))
    f = 0.0
    for _ in range(iterations + 1):
        denom = (w * (q * q).sum(1)).sum()
        if denom <= 0:
            break
        f = float((w * (p * q).sum(1)).sum() / denom)
        w = 1.0 / np.maximum(np.linalg.norm(p - f * q, axis=1), 1e-6)
    if not np.isfinite(f) or f <= 0:
        raise ValueError(f"estimate_focal: degenerate estimate {f}")
    return f


def intrinsics(focal: float, height: int, width: int) -> np.ndarray:
    """``K [3,3]`` with square pixels and the principal point at the image centre."""
    cx, cy = principal_point(height, width)
    return np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])


def pnp_poses(points: np.ndarray, K: np.ndarray, valid: np.ndarray | None = None,
              reprojection_px: float = 5.0, max_points: int | None = 4096, seed: int = 0,
              iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Per-view PnP-RANSAC (SQPnP) of global points against their pixel coordinates.

    Args:
        points: ``[N,H,W,3]`` global points (view 0's frame); K: ``[3,3]`` shared intrinsics.
        valid: ``[N,H,W]`` pixels allowed (default: finite points).
        reprojection_px: RANSAC inlier threshold in pixels.
        max_points: correspondences sampled per view (deterministic with ``seed``).
    Returns:
        ``(c2w [N,4,4] float64, ok [N] bool)``; a failed view gets the identity and False.
    """
    N, H, W = points.shape[:3]
    u, v = pixel_grid(H, W)
    pix = np.stack([u, v], axis=-1).reshape(-1, 2)
    c2w = np.tile(np.eye(4), (N, 1, 1))
    ok = np.zeros(N, dtype=bool)
    K = np.asarray(K, np.float64)
    for i in range(N):
        use = finite_points(points[i])
        if valid is not None:
            use &= valid[i]
        idx = np.flatnonzero(use)
        idx = idx[subsample_indices(len(idx), max_points, seed + i)]
        if len(idx) < 6:
            continue
        obj = np.ascontiguousarray(points[i].reshape(-1, 3)[idx], dtype=np.float64)
        img = np.ascontiguousarray(pix[idx], dtype=np.float64)
        try:
            found, rvec, tvec, inliers = cv2.solvePnPRansac(
                obj, img, K, None, iterationsCount=iterations,
                reprojectionError=float(reprojection_px), confidence=0.999,
                flags=cv2.SOLVEPNP_SQPNP)
        except cv2.error:
            continue
        if not found or inliers is None or len(inliers) < 3:
            continue
        w2c = np.eye(4)
        w2c[:3, :3] = cv2.Rodrigues(rvec)[0]
        w2c[:3, 3] = tvec.reshape(3)
        c2w[i] = invert_pose(w2c)
        ok[i] = True
    return c2w, ok


def procrustes_poses(local: np.ndarray, global_: np.ndarray, conf: np.ndarray,
                     valid: np.ndarray | None = None, fraction: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-view poses from the sim(3) of local onto global points.

    Args:
        local, global_: ``[N,H,W,3]``; conf: ``[N,H,W]`` weights; valid: ``[N,H,W]``;
        fraction: per-view top confident share used (None: all valid pixels).
    Returns:
        ``(c2w [N,4,4] rigid, scale [N])``; a failed view gets the identity and NaN scale.
    """
    _, T, ok = local_to_global(local, global_, conf, valid, fraction)
    scale = np.cbrt(np.linalg.det(T[:, :3, :3]))
    c2w = T.copy()
    c2w[:, :3, :3] = T[:, :3, :3] / np.where(scale > 0, scale, 1.0)[:, None, None]
    scale = np.where(ok, scale, np.nan)
    return c2w, scale


def confident_pixels(xyz_global: np.ndarray, conf: np.ndarray, percentile: float
                     ) -> tuple[np.ndarray, float]:
    """``(keep [N,H,W] bool, threshold)``: finite points whose confidence ``conf [N,H,W]`` is at
    or above its ``percentile`` over the finite pixels (threshold inf if none is finite)."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"conf_percentile must be in [0, 100], got {percentile}")
    finite = finite_points(xyz_global) & np.isfinite(conf)
    threshold = float(np.percentile(conf[finite], percentile)) if finite.any() else float("inf")
    return finite & (conf >= threshold), threshold


@dataclass
class Cameras:
    """Cameras estimated from one prediction: shared ``K [3,3]`` at the prediction's resolution,
    ``c2w [N,4,4]`` in view 0's camera frame (model scale) and how each pose was found
    (``identity`` for view 0, ``pnp`` or ``procrustes``)."""

    K: np.ndarray
    c2w: np.ndarray
    methods: list[str]

    @property
    def focal(self) -> float:
        return float(self.K[0, 0])

    @property
    def pnp_failed(self) -> int:
        return self.methods.count("procrustes")


def estimate_cameras(pred: Mapping[str, np.ndarray], keep: np.ndarray,
                     reprojection_px: float = 5.0, seed: int = 0) -> Cameras:
    """Cameras from predicted maps (``xyz_global``, ``xyz_local`` ``[N,H,W,3]``,
    ``conf_local [N,H,W]``) on the ``keep [N,H,W]`` pixels (see the module docstring).

    The maps and ``keep`` are only read one view at a time (``a[i]``, ``a.shape``), each view
    converted to float64 on its own, so disk-backed maps
    (:class:`distill3r.mapstore.StoredArray`) work at any number of views.
    When view 0 has no usable point in front of it the focal is ``max(H, W)`` (about 53
    degrees of field of view), with a warning."""
    N, H, W = keep.shape
    glob = pred["xyz_global"]
    try:
        focal = estimate_focal(glob[0], keep[0])
    except ValueError:
        focal = float(max(H, W))
        log.warning("no usable points in front of view 0: focal length set to %.0f px", focal)
    K = intrinsics(focal, H, W)
    c2w, ok = pnp_poses(glob, K, keep, reprojection_px, seed=seed)
    c2w[0], ok[0] = np.eye(4), True
    methods = ["identity"] + ["pnp" if o else "procrustes" for o in ok[1:]]
    failed = np.flatnonzero(~ok)
    for i in failed:
        one = [np.asarray(pred[k][i], np.float64)[None] for k in ("xyz_local", "xyz_global",
                                                                  "conf_local")]
        c2w[i] = procrustes_poses(*one, np.asarray(keep[i])[None])[0][0]
    if len(failed):
        log.warning("PnP failed for view(s) %s: Procrustes poses used",
                    ", ".join(str(i) for i in failed))
    return Cameras(K, c2w, methods)


def _rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Angle of rotations ``[...,3,3]`` (atan2 of sine and cosine: accurate near 0)."""
    vee = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0],
                    R[..., 1, 0] - R[..., 0, 1]], axis=-1)
    cos2 = np.trace(R, axis1=-2, axis2=-1) - 1.0
    return np.degrees(np.arctan2(np.linalg.norm(vee, axis=-1), cos2))


def relative_pose_errors(pred_c2w: np.ndarray, ref_c2w: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Rotation and translation-direction errors (degrees) over all pairs ``i < j``.

    Args:
        pred_c2w, ref_c2w: ``[N,4,4]`` (any world frames and scales; rigid rotations).
    Returns:
        ``(rot_err [P], trans_err [P])`` with ``P = N (N - 1) / 2``. The translation error is
        the angle between the lines of the two translations, in [0, 90] (a reversed direction
        scores 0, as in Fast3R's metric). A zero-length translation (either side) gives 90
        degrees unless both are zero (0 degrees).
    """
    pred_c2w = np.asarray(pred_c2w, np.float64)
    ref_c2w = np.asarray(ref_c2w, np.float64)
    if pred_c2w.shape != ref_c2w.shape:
        raise ValueError(f"pose shapes differ: {pred_c2w.shape} vs {ref_c2w.shape}")
    i, j = np.triu_indices(len(pred_c2w), k=1)
    rel_p = invert_pose(pred_c2w[i]) @ pred_c2w[j]
    rel_r = invert_pose(ref_c2w[i]) @ ref_c2w[j]
    rot = _rotation_angle_deg(np.swapaxes(rel_p[:, :3, :3], 1, 2) @ rel_r[:, :3, :3])
    tp, tr = rel_p[:, :3, 3], rel_r[:, :3, 3]
    np_, nr = np.linalg.norm(tp, axis=1), np.linalg.norm(tr, axis=1)
    trans = np.degrees(np.arctan2(np.linalg.norm(np.cross(tp, tr), axis=1),
                                  np.abs((tp * tr).sum(1))))
    one_zero = (np_ < 1e-9) != (nr < 1e-9)
    trans = np.where(one_zero, 90.0, np.where((np_ < 1e-9) & (nr < 1e-9), 0.0, trans))
    return rot, trans


def pose_metrics(rot_err: np.ndarray, trans_err: np.ndarray,
                 thresholds: tuple[int, ...] = (5, 15), max_threshold: int = 30
                 ) -> dict[str, float]:
    """Summary of pairwise errors (degrees): ``rot_err, trans_err`` (means), ``rra_<t>``,
    ``rta_<t>`` and ``maa_<max_threshold>`` as fractions. All NaN without pairs."""
    rot_err = np.asarray(rot_err, np.float64)
    trans_err = np.asarray(trans_err, np.float64)
    keys = (["rot_err", "trans_err"] + [f"rra_{t}" for t in thresholds]
            + [f"rta_{t}" for t in thresholds] + [f"maa_{max_threshold}"])
    if rot_err.size == 0:
        return {k: float("nan") for k in keys}
    out = {"rot_err": float(rot_err.mean()), "trans_err": float(trans_err.mean())}
    for t in thresholds:
        out[f"rra_{t}"] = float(np.mean(rot_err < t))
    for t in thresholds:
        out[f"rta_{t}"] = float(np.mean(trans_err < t))
    worst = np.maximum(rot_err, trans_err)
    grid = np.arange(1, max_threshold + 1)
    out[f"maa_{max_threshold}"] = float(np.mean(worst[None, :] < grid[:, None]))
    return out
