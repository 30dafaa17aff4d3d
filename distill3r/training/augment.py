"""Training augmentation that keeps the geometry of a cached sample consistent.

A decoded cache sample (see ``distill3r.cache.reader.decode_sample``) holds per-view tensors,
views first: ``images`` [N,3,H,W] float in [0,1], ``xyz_global``/``xyz_local`` [N,H,W,3],
``conf_global``/``conf_local``/``mask`` [N,H,W] and, with ground truth, ``depth`` [N,H,W],
``K`` [N,3,3], ``c2w`` [N,4,4]. ``xyz_global`` is expressed in view 0's camera frame.

What is done (all seeded, nothing that moves pixels):

- **Photometric jitter per view**: brightness, contrast and saturation factors drawn
  independently per view from ``[1 - s, 1 + s]``. Point maps are untouched: colour does not
  change geometry.
- **View subset**: when ``views`` is smaller than the cached number, view 0 is kept and
  ``views - 1`` of the other views are drawn (kept in their cached order). View 0 stays fixed
  because the teacher's global frame *is* view 0's camera frame: dropping or moving view 0
  would leave the global targets in the frame of a camera the student never sees.
- **New reference view** (``shuffle_view0``): a random one of the chosen views becomes view 0
  and the global targets are re-expressed in its camera frame. The rigid transform old-global ->
  new view's camera is estimated from the teacher itself: its global points of the new view
  against its local points of the same view (Umeyama on valid pixels). The fit includes a
  scale (the teacher's global and local heads may disagree on scale) but only the rigid part
  is applied (``x -> R x + t / s``) so the global targets keep the global head's scale. When
  fewer than 3 valid pixels exist, the sample keeps its original view 0.

No flips, crops or rotations: each would have to be applied to K, the point maps (x and y in
camera coordinates) and the teacher's confidences alike, and a crop changes the principal
point, so they are left out on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from distill3r.geometry import similarity_matrix, transform_points, umeyama
from distill3r.seeding import stable_seed

PER_VIEW_KEYS = ("images", "xyz_global", "xyz_local", "conf_global", "conf_local", "mask",
                 "depth", "K", "c2w")
_GRAY = (0.299, 0.587, 0.114)
_FIT_POINTS = 4096  # valid pixels used for the reference-change fit


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator for one sample in one epoch: independent of worker and rank layout."""
    return np.random.default_rng([int(seed), int(epoch), stable_seed(key)])


def color_jitter(images: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """Per-view brightness, contrast and saturation jitter of ``images`` [N,3,H,W] in [0,1]."""
    if strength <= 0:
        return images
    n = images.shape[0]
    lo, hi = 1.0 - strength, 1.0 + strength
    brightness, contrast, saturation = (
        torch.as_tensor(rng.uniform(lo, hi, size=n), dtype=images.dtype).view(n, 1, 1, 1)
        for _ in range(3)
    )
    weights = torch.tensor(_GRAY, dtype=images.dtype).view(1, 3, 1, 1)
    out = images * brightness
    mean = (out * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * contrast + mean
    gray = (out * weights).sum(1, keepdim=True)
    out = (out - gray) * saturation + gray
    return out.clamp_(0.0, 1.0)


def reference_transform(xyz_global: torch.Tensor, xyz_local: torch.Tensor, mask: torch.Tensor,
                        rng: np.random.Generator) -> Optional[np.ndarray]:
    """Rigid 4x4 mapping the current global frame to the camera frame of the view whose
    ``xyz_global``/``xyz_local`` [H,W,3] and ``mask`` [H,W] are given, or None (< 3 points)."""
    src = xyz_global.reshape(-1, 3).double().numpy()
    dst = xyz_local.reshape(-1, 3).double().numpy()
    valid = mask.reshape(-1).numpy() & np.isfinite(src).all(1) & np.isfinite(dst).all(1)
    idx = np.flatnonzero(valid)
    if len(idx) < 3:
        return None
    if len(idx) > _FIT_POINTS:
        idx = rng.choice(idx, _FIT_POINTS, replace=False)
    s, R, t = umeyama(src[idx], dst[idx], with_scale=True)
    return similarity_matrix(1.0, R, t / s) if s > 0 else None


def choose_views(num_cached: int, views: Optional[int], shuffle_view0: bool,
                 rng: np.random.Generator) -> list[int]:
    """Cached view indices for one training sample; element 0 is the reference view."""
    views = num_cached if views is None else views
    if not 1 <= views <= num_cached:
        raise ValueError(f"train.views={views} but the cache holds {num_cached} views per sample")
    others = sorted(rng.choice(np.arange(1, num_cached), views - 1, replace=False).tolist())
    chosen = [0] + others
    if shuffle_view0:
        ref = int(rng.integers(len(chosen)))
        chosen = [chosen[ref]] + chosen[:ref] + chosen[ref + 1:]
    return chosen


@dataclass
class Augmenter:
    """Callable ``(sample, epoch) -> sample`` applying the steps above, seeded per sample key."""

    views: Optional[int] = None
    shuffle_view0: bool = False
    color_jitter: float = 0.0
    seed: int = 0

    def __call__(self, sample: dict, epoch: int) -> dict:
        rng = sample_rng(self.seed, epoch, sample["key"])
        num_cached = sample["images"].shape[0]
        order = choose_views(num_cached, self.views, self.shuffle_view0, rng)
        T = None
        if order[0] != 0:
            ref = order[0]
            T = reference_transform(sample["xyz_global"][ref], sample["xyz_local"][ref],
                                    sample["mask"][ref], rng)
            if T is None:  # too few valid pixels to move the frame: keep the cached view 0
                order = sorted(order)
        out = dict(sample)
        if order != list(range(num_cached)):
            index = torch.as_tensor(order)
            for key in PER_VIEW_KEYS:
                if key in out:
                    out[key] = out[key].index_select(0, index)
        if T is not None:
            moved = transform_points(T, out["xyz_global"].double().numpy())
            out["xyz_global"] = torch.from_numpy(moved).to(out["xyz_global"].dtype)
        out["images"] = color_jitter(out["images"], self.color_jitter, rng)
        return out
