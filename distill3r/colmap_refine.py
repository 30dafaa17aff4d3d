"""Optional pose refinement: bundle adjustment over tracks from the point maps' cross-view
consistency (needs ``pycolmap``, the official COLMAP bindings: ``pip install
'distill3r[colmap]'``).

Tracks (:func:`consistency_tracks`): in every view, the kept pixels on a grid of step
``stride`` are anchors; for each of the view's ``views`` nearest other views (camera centres of
the initial poses), the anchor's nearest kept global point of that view (3-D, the predicted
global frame: no pose is used) is a match when it lies within ``tolerance`` times the median
distance of the kept points from view 0's camera, and is reciprocal: its own nearest kept point
back in the anchor's view is a pixel at most one pixel (Chebyshev) from the anchor. A track is
the anchor and its matches (two observations or more), started at the anchor's global point.

Bundle adjustment (:func:`bundle_adjust`): COLMAP's default bundle adjuster
(``pycolmap.create_default_bundle_adjuster``; ``colmap/src/colmap/estimators/bundle_adjustment.h``)
over every pose and point with the gauge of two fixed camera poses, Cauchy loss of scale 1 px, the intrinsics held fixed (the shared focal of
:func:`distill3r.evaluation.poses.estimate_cameras`; refining it drifted away from the truth
on the demo scenes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from distill3r.geometry import invert_pose

log = logging.getLogger(__name__)


@dataclass
class Tracks:
    """Observations of the tracks: per observation its ``track``, ``view`` and flat ``pixel``
    index at the model resolution (``[M]`` int64 each, grouped by track); ``xyz [T,3]`` the
    starting point of each track."""

    track: np.ndarray
    view: np.ndarray
    pixel: np.ndarray
    xyz: np.ndarray

    def __len__(self) -> int:
        return len(self.xyz)


def _nearest_views(c2w: np.ndarray, views: int) -> list[np.ndarray]:
    centres = np.asarray(c2w)[:, :3, 3]
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    return [np.argsort(d, kind="stable")[:min(views, len(c2w) - 1)] for d in dist]


def consistency_tracks(xyz_global, keep, c2w: np.ndarray, stride: int = 4,
                       tolerance: float = 0.01, views: int = 16) -> Tracks:
    """Tracks from cross-view consistency (module docstring).

    Args:
        xyz_global: ``[N,H,W,3]`` (``a[i]`` per view, e.g. a stored map); keep: ``[N,H,W]``
            bool (``a[i]``, ``a.shape``); c2w: ``[N,4,4]`` initial poses (only to choose each
            view's nearest views).
    """
    N, H, W = keep.shape
    idx = [np.flatnonzero(keep[i]) for i in range(N)]
    pts = [np.asarray(xyz_global[i], np.float64).reshape(-1, 3)[idx[i]] for i in range(N)]
    trees = [cKDTree(p) if len(p) else None for p in pts]
    scale = float(np.median(np.linalg.norm(pts[0], axis=1))) if len(pts[0]) else 1.0
    grid = np.zeros((H, W), bool)
    grid[::stride, ::stride] = True
    track, view, pixel, start = [], [], [], []
    count = 0
    for i, near in enumerate(_nearest_views(c2w, views)):
        sel = np.flatnonzero(grid.reshape(-1)[idx[i]])
        if not len(sel) or trees[i] is None:
            continue
        anchors = pts[i][sel]
        found_view, found_pix, found_k = [], [], []
        for j in near:
            if trees[j] is None:
                continue
            d, q = trees[j].query(anchors)
            back = trees[i].query(pts[j][q])[1]
            a, b = idx[i][sel], idx[i][back]
            close = np.maximum(np.abs(a % W - b % W), np.abs(a // W - b // W)) <= 1
            ok = np.flatnonzero((d < tolerance * scale) & close)
            found_view.append(np.full(len(ok), j))
            found_pix.append(idx[j][q[ok]])
            found_k.append(ok)
        if not found_k:
            continue
        k = np.concatenate(found_k)
        matched = np.unique(k)
        ids = np.full(len(sel), -1)
        ids[matched] = count + np.arange(len(matched))
        count += len(matched)
        track += [ids[matched], ids[k]]
        view += [np.full(len(matched), i), np.concatenate(found_view)]
        pixel += [idx[i][sel[matched]], np.concatenate(found_pix)]
        start.append(anchors[matched])
    if not start:
        empty = np.zeros(0, np.int64)
        return Tracks(empty, empty, empty, np.zeros((0, 3)))
    track, view, pixel = (np.concatenate(a).astype(np.int64) for a in (track, view, pixel))
    order = np.argsort(track, kind="stable")
    return Tracks(track[order], view[order], pixel[order], np.concatenate(start))


def _pycolmap():
    try:
        import pycolmap
    except ImportError as exc:
        raise ValueError("infer.refine needs pycolmap (pip install 'distill3r[colmap]' or "
                         "pip install pycolmap)") from exc
    return pycolmap


def bundle_adjust(K: np.ndarray, c2w: np.ndarray, tracks: Tracks, hw: tuple[int, int],
                  max_iterations: int = 100) -> tuple[np.ndarray, dict]:
    """Refined ``c2w [N,4,4]`` (view 0's frame re-anchored: view 0 the identity, the scale of
    the input poses' mean camera distance from view 0) and a summary dict."""
    pycolmap = _pycolmap()
    N, (H, W) = len(c2w), hw
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera(
        model="PINHOLE", width=W, height=H, camera_id=1,
        params=[K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5]))  # COLMAP: centre at +0.5
    slot = np.zeros(len(tracks.view), np.int64)  # index of each observation in its image
    for i in range(N):
        mine = np.flatnonzero(tracks.view == i)
        slot[mine] = np.arange(len(mine))
        xy = np.stack([tracks.pixel[mine] % W, tracks.pixel[mine] // W], 1) + 0.5
        w2c = invert_pose(c2w[i])
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=str(i), keypoints=xy.astype(np.float64), camera_id=1,
                           image_id=i + 1),
            pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]), w2c[:3, 3]))
    bounds = np.flatnonzero(np.diff(tracks.track, prepend=-1, append=len(tracks)))
    for t, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        track = pycolmap.Track()
        for o in range(lo, hi):
            track.add_element(int(tracks.view[o]) + 1, int(slot[o]))
        rec.add_point3D(tracks.xyz[t], track)
    options = pycolmap.BundleAdjustmentOptions()
    options.refine_focal_length = False
    options.refine_principal_point = False
    options.refine_extra_params = False
    options.print_summary = False
    options.ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
    options.ceres.loss_function_scale = 1.0
    options.ceres.solver_options.max_num_iterations = max_iterations
    config = pycolmap.BundleAdjustmentConfig()
    for i in range(N):
        config.add_image(i + 1)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    summary = pycolmap.create_default_bundle_adjuster(options, config, rec).solve()
    w2c = np.tile(np.eye(4), (N, 1, 1))
    for i in range(N):
        w2c[i, :3] = rec.images[i + 1].cam_from_world().matrix()
    refined = invert_pose(w2c)
    refined = invert_pose(refined[0])[None] @ refined  # view 0 the identity again
    before = np.linalg.norm(c2w[1:, :3, 3], axis=1).mean() if N > 1 else 0.0
    after = np.linalg.norm(refined[1:, :3, 3], axis=1).mean() if N > 1 else 0.0
    if after > 0 and before > 0:
        refined[:, :3, 3] *= before / after
    return refined, {"tracks": len(tracks), "observations": int(len(tracks.view)),
                     "termination": str(summary.termination_type).split(".")[-1]}


def refine_poses(xyz_global, keep, K: np.ndarray, c2w: np.ndarray, params) -> tuple[np.ndarray,
                                                                                    dict]:
    """:func:`consistency_tracks` then :func:`bundle_adjust` with the ``refine_*`` settings
    of ``params`` (:class:`distill3r.config.InferParams`); the input poses come back unchanged
    (with a warning) when there are fewer than two views or no track."""
    _pycolmap()  # fail before the work when pycolmap is missing
    t0 = time.perf_counter()
    tracks = consistency_tracks(xyz_global, keep, c2w, params.refine_stride,
                                params.refine_tolerance, params.refine_views)
    if len(c2w) < 2 or len(tracks) == 0:
        log.warning("refine: %d view(s), %d track(s): poses left as estimated", len(c2w),
                    len(tracks))
        return c2w, {"tracks": len(tracks), "observations": int(len(tracks.view)),
                     "seconds": time.perf_counter() - t0, "applied": False}
    refined, summary = bundle_adjust(K, c2w, tracks, keep.shape[1:])
    return refined, {**summary, "seconds": time.perf_counter() - t0, "applied": True}
