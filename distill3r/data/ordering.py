"""Frame orderings for datasets without a capture order, and the pose distance behind them.

Photo collections (MegaDepth) and multi-view captures listed by file name (BlendedMVS) have no
time axis; consecutive frames should still overlap, because the cache's ``stride`` and
``nearby`` samplings treat frame-order neighbours as view neighbours. :func:`chain_order`
turns any pairwise affinity (shared SfM points, a dataset's own pair list, or the negated
:func:`pose_distance`) into a greedy chain: start at one end of the set, then always step to
the unvisited frame with the highest affinity to the current one.
"""

from __future__ import annotations

import numpy as np


def chain_order(affinity: np.ndarray) -> list[int]:
    """A permutation of ``range(n)`` that walks ``affinity`` ``[n,n]`` (higher = closer)
    greedily from one end of the set (found by a first walk from the best-connected frame).
    Ties go to the lower index, so the order is deterministic."""
    a = np.asarray(affinity, np.float64)
    n = a.shape[0]
    if a.shape != (n, n):
        raise ValueError(f"affinity must be square, got {a.shape}")
    if n == 0:
        return []
    a = np.where(np.eye(n, dtype=bool), -np.inf, a)
    total = np.where(np.isfinite(a), a, 0.0).sum(axis=1)
    first = _greedy_walk(a, total, int(np.argmax(total)))
    return _greedy_walk(a, total, first[-1])


def _greedy_walk(a: np.ndarray, total: np.ndarray, start: int) -> list[int]:
    n = a.shape[0]
    order = [start]
    visited = np.zeros(n, bool)
    visited[start] = True
    while len(order) < n:
        row = np.where(visited, -np.inf, a[order[-1]])
        nxt = int(np.argmax(row))
        if visited[nxt] or not np.isfinite(row[nxt]):  # disconnected: best-connected rest
            nxt = int(np.argmax(np.where(visited, -np.inf, total)))
        order.append(nxt)
        visited[nxt] = True
    return order


def pose_distance(c2w: np.ndarray, angle_weight: float = 1.0) -> np.ndarray:
    """``[n,n]`` distance between OpenCV camera-to-world poses ``c2w`` ``[n,4,4]``: camera
    centre distance divided by the median centre distance of the set (so it is scale-free),
    plus ``angle_weight`` times the angle between viewing directions (radians)."""
    c2w = np.asarray(c2w, np.float64)
    centres = c2w[:, :3, 3]
    dirs = c2w[:, :3, 2]
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    off = dist[~np.eye(len(c2w), dtype=bool)]
    scale = float(np.median(off)) if off.size and np.median(off) > 0 else 1.0
    cos = np.clip(dirs @ dirs.T, -1.0, 1.0)
    return dist / scale + angle_weight * np.arccos(cos)
