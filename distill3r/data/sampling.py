"""View sampling: which frames of a scene form one multi-view sample.

Two strategies (``cache.sampling``):
- ``"stride"``: ``views_per_sample`` consecutive frames ``frame_stride`` apart; up to
  ``max_samples_per_scene`` windows whose start offsets are spread evenly over the scene;
- ``"random"``: distinct random subsets of ``views_per_sample`` frames, drawn with a generator
  seeded from ``(seed, dataset, scene)`` by a stable hash (not Python's salted ``hash()``), so a
  scene's samples do not depend on which other scenes are in the manifest.
Frames inside a sample are in ascending frame order (view 0 = earliest frame). Scenes with too
few frames are skipped, returned, and reported with a warning.

Sample ids are ``s000, s001, ...`` per scene; the WebDataset key is
``"<dataset>__<scene>__sNNN"`` with every character outside ``[A-Za-z0-9_-]`` (dots in
particular, which WebDataset treats as extension separators) replaced by ``_``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np

from distill3r.data.manifest import FrameRecord

SAMPLING_MODES = ("stride", "random")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_ENUMERATE_LIMIT = 20_000  # enumerate all subsets when there are at most this many


def stable_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` that is stable across runs, machines and Python versions."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def sample_key(dataset: str, scene: str, index: int) -> str:
    """``"<dataset>__<scene>__sNNN"`` made safe for WebDataset (no dots, no slashes)."""
    return _UNSAFE.sub("_", f"{dataset}__{scene}__s{index:03d}")


@dataclass
class ViewSample:
    """One multi-view sample: an ordered list of frames of one scene."""

    key: str
    dataset: str
    split: str
    scene: str
    sample_id: str
    frames: list[FrameRecord]

    @property
    def frame_ids(self) -> list[int]:
        return [int(r.frame) for r in self.frames]


def _stride_windows(n: int, views: int, stride: int, max_samples: int) -> list[list[int]]:
    span = (views - 1) * stride + 1
    starts_available = n - span + 1
    if starts_available < 1:
        return []
    k = min(max_samples, starts_available)
    starts = np.round(np.linspace(0, starts_available - 1, k)).astype(int)
    return [list(range(s, s + span, stride)) for s in starts]


def _random_subsets(n: int, views: int, max_samples: int, seed: int) -> list[list[int]]:
    if n < views:
        return []
    rng = np.random.default_rng(seed)
    total = math.comb(n, views)
    k = min(max_samples, total)
    if total <= _ENUMERATE_LIMIT:
        combos = list(itertools.combinations(range(n), views))
        picks = rng.choice(total, size=k, replace=False)
        return [list(combos[i]) for i in picks]
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < k:  # total > 20000 >= k*?: collisions are rare, terminates quickly
        subset = tuple(sorted(rng.choice(n, size=views, replace=False).tolist()))
        if subset not in seen:
            seen.add(subset)
            out.append(list(subset))
    return out


def sample_views(groups: dict[tuple[str, str, str], list[FrameRecord]], views_per_sample: int,
                 max_samples_per_scene: int, sampling: str = "random", frame_stride: int = 1,
                 seed: int = 0) -> tuple[list[ViewSample], list[dict]]:
    """Samples for every scene of ``groups`` (from ``group_scenes``), in scene order.

    Returns:
        ``(samples, skipped)``; ``skipped`` lists ``{"dataset","split","scene","frames",
        "needed"}`` for scenes with too few frames (also reported with ``warnings.warn``).
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"cache.sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if views_per_sample < 1 or max_samples_per_scene < 1 or frame_stride < 1:
        raise ValueError("cache.views_per_sample, max_samples_per_scene and frame_stride must "
                         f"be >= 1, got {views_per_sample}, {max_samples_per_scene}, "
                         f"{frame_stride}")
    needed = (views_per_sample - 1) * frame_stride + 1 if sampling == "stride" else views_per_sample
    samples: list[ViewSample] = []
    skipped: list[dict] = []
    owners: dict[str, tuple] = {}
    for (dataset, split, scene), frames in groups.items():
        n = len(frames)
        if sampling == "stride":
            picks = _stride_windows(n, views_per_sample, frame_stride, max_samples_per_scene)
        else:
            picks = _random_subsets(n, views_per_sample, max_samples_per_scene,
                                    stable_seed(seed, dataset, scene))
        if not picks:
            skipped.append({"dataset": dataset, "split": split, "scene": scene, "frames": n,
                            "needed": needed})
            continue
        for i, idx in enumerate(picks):
            key = sample_key(dataset, scene, i)
            if key in owners:
                if owners[key] != (dataset, scene):
                    raise ValueError(f"sample key collision: {key!r} from scenes {owners[key]} "
                                     f"and {(dataset, scene)} (names differ only in characters "
                                     "replaced by '_')")
                raise ValueError(f"scene {scene!r} of dataset {dataset!r} appears in more than "
                                 "one split of the manifest")
            owners[key] = (dataset, scene)
            samples.append(ViewSample(key=key, dataset=dataset, split=split, scene=scene,
                                      sample_id=f"s{i:03d}", frames=[frames[j] for j in idx]))
    if skipped:
        names = ", ".join(f"{s['dataset']}/{s['scene']} ({s['frames']})" for s in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        warnings.warn(f"{len(skipped)} scene(s) have fewer than the {needed} frames a "
                      f"{sampling} sample needs and were skipped: {names}{more}", stacklevel=2)
    return samples, skipped
