"""``sample_views``: view sampling with the cache-wide values given one by one (tests only)."""

from __future__ import annotations

from collections.abc import Sequence

from distill3r.config import DatasetSampling
from distill3r.data.manifest import FrameRecord
from distill3r.data.sampling import SamplingRule, ViewSample, dataset_rules, sample_scenes


def sample_views(groups: dict[tuple[str, str, str], list[FrameRecord]], views_per_sample: int,
                 max_samples_per_scene: int, sampling: str = "random", frame_stride: int = 1,
                 seed: int = 0, *, neighbours: int = 8,
                 overrides: Sequence[DatasetSampling] = ()) -> tuple[list[ViewSample], list[dict]]:
    """:func:`sample_scenes` with ``overrides`` (``cache.dataset_sampling``) checked by
    :func:`dataset_rules`."""
    base = SamplingRule(sampling, views_per_sample, max_samples_per_scene, frame_stride,
                        neighbours)
    return sample_scenes(groups, base, dataset_rules(base, overrides), seed)
