"""View sampling: which frames of a scene form one multi-view sample.

Three strategies (``cache.sampling``):
- ``"stride"``: ``views_per_sample`` consecutive frames ``frame_stride`` apart; up to
  ``max_samples_per_scene`` windows whose start offsets are spread evenly over the scene;
- ``"random"``: distinct random subsets of ``views_per_sample`` frames, drawn with a generator
  seeded from ``(seed, dataset, scene)`` by a stable hash (not Python's salted ``hash()``), so a
  scene's samples do not depend on which other scenes are in the manifest;
- ``"nearby"``: views that overlap. Each sample has an anchor frame (one drawn from each of
  ``max_samples_per_scene`` equal slices of the scene, with the generator of ``"random"``) and
  ``views_per_sample - 1`` other frames drawn from the anchor's ``neighbours`` nearest frames:
  nearest by :func:`~distill3r.data.ordering.pose_distance` when every frame of the scene has a
  ``c2w`` (and it has at most ``POSE_FRAMES_LIMIT`` frames: the distances are ``O(n^2)``), else
  by frame order ``|i - j|`` (sources order frames so that order neighbours overlap). An anchor
  whose neighbourhood has no unused subset left gives way to the others.
Frames inside a sample are in ascending frame order (view 0 = earliest frame); a scene's
samples are distinct. Scenes with too few frames are skipped, returned, and reported with a
warning.

``cache.dataset_sampling`` overrides ``sampling``, ``frame_stride``, ``neighbours`` and
``max_samples_per_scene`` for the scenes of one dataset (:func:`dataset_rules`).

Sample ids are ``s000, s001, ...`` per scene; the WebDataset key is
``"<dataset>__<scene>__sNNN"`` with every character outside ``[A-Za-z0-9_-]`` (dots in
particular, which WebDataset treats as extension separators) replaced by ``_``.
"""
from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from distill3r.config import CacheParams, DatasetSampling
from distill3r.data.manifest import FrameRecord
from distill3r.data.ordering import pose_distance
from distill3r.seeding import stable_seed

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_ENUMERATE_LIMIT = 20_000  # enumerate all subsets when there are at most this many
_ANCHOR_ENUMERATE_LIMIT = 2_000  # nearby: enumerate an anchor's subsets up to this many
_ANCHOR_TRIES = 200  # nearby: random draws before a large neighbourhood counts as used up
POSE_FRAMES_LIMIT = 2_000  # nearby: larger scenes use frame order (pose distances are O(n^2))


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


# ---------------------------------------------------------------------------------------------
# Nearby: an anchor and frames among its nearest
# ---------------------------------------------------------------------------------------------
def _all_posed(frames: list[FrameRecord]) -> bool:
    return bool(frames) and all(r.c2w is not None for r in frames)


def _order_neighbours(i: int, n: int, k: int) -> np.ndarray:
    """The ``k`` frames nearest to ``i`` in frame order: ``i-1, i+1, i-2, i+2, ...``."""
    offsets = np.arange(1, n)
    around = np.stack([i - offsets, i + offsets], axis=1).ravel()
    return around[(around >= 0) & (around < n)][:k]


def _neighbour_lookup(frames: list[FrameRecord], k: int) -> Callable[[int], np.ndarray]:
    """``near(i)``: indices of the ``k`` frames of ``frames`` nearest to frame ``i``, nearest
    first, ties to the lower index. By :func:`pose_distance` when every frame has a ``c2w`` and
    there are at most ``POSE_FRAMES_LIMIT`` frames (the distance matrix is ``O(n^2)``), else
    by frame order."""
    n = len(frames)
    if not _all_posed(frames) or n > POSE_FRAMES_LIMIT:
        return lambda i: _order_neighbours(i, n, k)
    # rounded so that last-bit differences between BLAS builds cannot reorder exact ties
    dist = np.round(pose_distance(np.stack([r.c2w for r in frames])), 9)
    np.fill_diagonal(dist, np.inf)
    table = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return lambda i: table[i]


def _spread_anchors(candidates: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` frames of ``candidates``, one drawn from each of ``count`` equal slices of it
    (a one-frame slice repeats when ``count`` exceeds ``len(candidates)``)."""
    m = len(candidates)
    lo = np.arange(count) * m // count
    hi = np.maximum(lo + 1, np.arange(1, count + 1) * m // count)
    return [int(candidates[j]) for j in rng.integers(lo, hi)]


def _draw_near(anchor: int, near: np.ndarray, others: int, taken: set[tuple[int, ...]],
               rng: np.random.Generator) -> tuple[int, ...] | None:
    """A sorted subset not in ``taken``: ``anchor`` plus ``others`` frames of ``near``; None
    when every such subset is taken (or, for a huge neighbourhood, no draw found a free one)."""
    if math.comb(len(near), others) <= _ANCHOR_ENUMERATE_LIMIT:
        free = [s for c in itertools.combinations(near.tolist(), others)
                if (s := tuple(sorted((anchor, *c)))) not in taken]
        return free[int(rng.integers(len(free)))] if free else None
    for _ in range(_ANCHOR_TRIES):
        subset = tuple(sorted((anchor, *rng.choice(near, size=others, replace=False).tolist())))
        if subset not in taken:
            return subset
    return None


def _nearby_subsets(near: Callable[[int], np.ndarray], n: int, views: int, max_samples: int,
                    seed: int) -> list[list[int]]:
    """Distinct samples of ``views`` frames, each an anchor plus frames of ``near(anchor)``;
    anchors spread over the frames whose neighbourhood still has an unused subset."""
    if n < views:
        return []
    rng = np.random.default_rng(seed)
    taken: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    used_up = np.zeros(n, bool)
    # every anchor visit adds a sample or marks the anchor used up, so the loop ends
    while len(out) < max_samples and not used_up.all():
        for anchor in _spread_anchors(np.flatnonzero(~used_up), max_samples - len(out), rng):
            subset = _draw_near(anchor, near(anchor), views - 1, taken, rng)
            if subset is None:
                used_up[anchor] = True
            else:
                taken.add(subset)
                out.append(list(subset))
    return out


# ---------------------------------------------------------------------------------------------
# Rules: cache-wide values and per-dataset overrides
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingRule:
    """How the scenes of one dataset are sampled: the cache-wide values (``cache.*``) or a
    dataset's override of them. ``neighbours`` is used by ``"nearby"`` only."""

    sampling: str
    views_per_sample: int
    max_samples_per_scene: int
    frame_stride: int = 1
    neighbours: int = 8

    @property
    def needed(self) -> int:
        """Frames a scene needs for one sample."""
        if self.sampling == "stride":
            return (self.views_per_sample - 1) * self.frame_stride + 1
        return self.views_per_sample


_OVERRIDABLE = ("sampling", "frame_stride", "neighbours", "max_samples_per_scene")


def dataset_rules(base: SamplingRule,
                  overrides: Sequence[DatasetSampling] = ()) -> dict[str, SamplingRule]:
    """Check ``base`` (the cache-wide values) and ``overrides`` (``cache.dataset_sampling``)
    with :meth:`CacheParams.validate` and return ``{dataset: rule}`` for every overridden
    dataset (others use ``base``).

    Raises:
        ValueError: naming the key, e.g. ``cache.dataset_sampling[1].sampling: 'x' is not one
        of ...``; also for a dataset listed twice.
    """
    CacheParams(sampling=base.sampling, views_per_sample=base.views_per_sample,  # type: ignore
                max_samples_per_scene=base.max_samples_per_scene, frame_stride=base.frame_stride,
                neighbours=base.neighbours, dataset_sampling=list(overrides)).validate("cache")
    rules: dict[str, SamplingRule] = {}
    for entry in overrides:
        changes = {k: getattr(entry, k) for k in _OVERRIDABLE if getattr(entry, k) is not None}
        rules[entry.dataset] = replace(base, **changes)
    return rules


# ---------------------------------------------------------------------------------------------
# Sampling a manifest
# ---------------------------------------------------------------------------------------------
def _scene_picks(frames: list[FrameRecord], rule: SamplingRule, seed: int) -> list[list[int]]:
    """Frame positions (into ``frames``) of each sample of one scene; empty if too few."""
    n = len(frames)
    if rule.sampling == "stride":
        return _stride_windows(n, rule.views_per_sample, rule.frame_stride,
                               rule.max_samples_per_scene)
    if rule.sampling == "random":
        return _random_subsets(n, rule.views_per_sample, rule.max_samples_per_scene, seed)
    near = _neighbour_lookup(frames, min(rule.neighbours, max(n - 1, 0)))
    return _nearby_subsets(near, n, rule.views_per_sample, rule.max_samples_per_scene, seed)


def _warn_unused(rules: dict[str, SamplingRule], datasets: set[str]) -> None:
    absent = sorted(set(rules) - datasets)
    if absent:
        warnings.warn(f"cache.dataset_sampling: no scene of dataset(s) {', '.join(absent)} in "
                      f"the manifest (it has: {', '.join(sorted(datasets)) or 'none'}); their "
                      "override is unused", stacklevel=3)


def _warn_list(what: str, items: list[str]) -> None:
    more = f" and {len(items) - 10} more" if len(items) > 10 else ""
    warnings.warn(f"{len(items)} scene(s) {what}: {', '.join(items[:10])}{more}", stacklevel=3)


def sample_scenes(groups: dict[tuple[str, str, str], list[FrameRecord]], base: SamplingRule,
                  rules: dict[str, SamplingRule] | None = None,
                  seed: int = 0) -> tuple[list[ViewSample], list[dict]]:
    """Samples for every scene of ``groups`` (from ``group_scenes``), in scene order, each scene
    by ``rules[dataset]`` (from :func:`dataset_rules`) or else ``base``.

    Returns:
        ``(samples, skipped)``; ``skipped`` lists ``{"dataset","split","scene","frames",
        "needed"}`` for scenes with too few frames (also reported with ``warnings.warn``).
    """
    rules = rules or {}
    _warn_unused(rules, {d for d, _, _ in groups})
    samples: list[ViewSample] = []
    skipped: list[dict] = []
    large_posed: list[str] = []
    owners: dict[str, tuple] = {}
    for (dataset, split, scene), frames in groups.items():
        rule = rules.get(dataset, base)
        if rule.sampling == "nearby" and _all_posed(frames) and len(frames) > POSE_FRAMES_LIMIT:
            large_posed.append(f"{dataset}/{scene} ({len(frames)})")
        picks = _scene_picks(frames, rule, stable_seed(seed, dataset, scene))
        if not picks:
            skipped.append({"dataset": dataset, "split": split, "scene": scene,
                            "frames": len(frames), "needed": rule.needed})
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
    if large_posed:
        _warn_list(f"have more than {POSE_FRAMES_LIMIT} frames: nearby sampling used frame "
                   "order, not poses, for them", large_posed)
    if skipped:
        _warn_list("have fewer frames than a sample needs and were skipped",
                   [f"{s['dataset']}/{s['scene']} ({s['frames']} < {s['needed']})"
                    for s in skipped])
    return samples, skipped

