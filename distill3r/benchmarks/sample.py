"""Benchmark scenes, seeded frame selection, and evaluation samples at a model's grid.

A reader (``readers.py``) lists a benchmark's scenes as :class:`BenchScene` objects whose
frames load lazily (:class:`BenchFrame`: ``load() -> (rgb [h,w,3] uint8, depth [h,w] float32
in the benchmark's units with 0 invalid, K [3,3], c2w [4,4] OpenCV camera-to-world)``).
A selection rule picks the frames of each sample (:func:`select_frames`), and
:func:`load_sample` brings them to one evaluation grid with the project's resize rule
(:class:`distill3r.data.view.ViewTransform`: cover, centre-crop, never stretch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from distill3r.data.sampling import sample_key, stable_seed
from distill3r.data.view import ViewTransform, fit_size

FrameData = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class BenchFrame:
    """One frame: a label (the dataset's frame id) and a loader of its data (see module)."""

    label: str
    load: Callable[[], FrameData]


@dataclass
class BenchScene:
    """One scene (a sequence, a scan, an object video) with its frames in capture order."""

    name: str
    frames: list[BenchFrame]


@dataclass
class BenchSample:
    """One evaluation sample at the grid ``(H, W)``.

    Attributes:
        benchmark, scene, key: names (``key``: :func:`distill3r.data.sampling.sample_key`).
        frames: the frame labels, view 0 first.
        images: ``[N,H,W,3]`` uint8; depth: ``[N,H,W]`` float32 (0 invalid); K ``[N,3,3]``;
            c2w ``[N,4,4]`` (the dataset's world frame).
        sources: the N source RGB images ``[h,w,3]`` the grid views were cut from (for models
            that preprocess images themselves, e.g. the Fast3R adapter).
    """

    benchmark: str
    scene: str
    key: str
    frames: list[str]
    images: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    c2w: np.ndarray
    sources: list[np.ndarray] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


# ---------------------------------------------------------------------------------------------
# Frame selection
# ---------------------------------------------------------------------------------------------
def window_frames(count: int, views: int, max_gap: int, rng: np.random.Generator) -> list[int]:
    """Spann3R's ``sample_frames`` rule (HengyiWang/spann3r ``spann3r/datasets/
    base_many_view_dataset.py``, ``BaseManyViewDataset.sample_frames``), used by Fast3R's
    7-Scenes / NRGBD evaluation with ``full_video=False``: a first index drawn from the first
    ``max(count // views, count - max_gap * (views - 1))`` frames, then each next index drawn
    from the ``max_gap`` frames after the current one (leaving room for the rest), and the
    whole list reversed with probability 1/2. Returns ``views`` distinct frame indices.
    """
    if count < views:
        raise ValueError(f"window sampling needs at least {views} frames, the scene has {count}")
    for _ in range(100):
        first_range = max(count // views, count - max_gap * (views - 1))
        picked = [int(rng.integers(0, first_range))]
        while len(picked) < views:
            hi = min(picked[-1] + max_gap, count - (views - len(picked)))
            options = [i for i in range(picked[-1] + 1, hi + 1) if i not in picked]
            if not options:
                break
            picked.append(int(options[rng.integers(0, len(options))]))
        if len(picked) == views:
            return picked[::-1] if rng.integers(0, 2) else picked
    raise ValueError(f"window sampling found no {views} frames within gaps of {max_gap}")


def keyframes(count: int, every: int) -> list[int]:
    """Every ``every``-th frame from the first (Spann3R's ``full_video=True, kf_every``)."""
    return list(range(0, count, max(1, every)))


def random_frames(count: int, views: int, rng: np.random.Generator) -> list[int]:
    """``views`` distinct frames uniformly at random, in the order drawn (Fast3R's CO3D pose
    protocol draws views from a window of the whole 360-degree video)."""
    if count < views:
        raise ValueError(f"random sampling needs at least {views} frames, the scene has {count}")
    return [int(i) for i in rng.choice(count, size=views, replace=False)]


def select_frames(mode: str, count: int, views: int, rng: np.random.Generator,
                  max_gap: int = 100, every: int = 1) -> list[int]:
    """Dispatch on ``mode``: ``window`` | ``keyframes`` | ``random`` (see the functions)."""
    if mode == "window":
        return window_frames(count, views, max_gap, rng)
    if mode == "keyframes":
        return keyframes(count, every)
    if mode == "random":
        return random_frames(count, views, rng)
    raise ValueError(f"unknown frame selection {mode!r} (window, keyframes, random)")


def sample_plan(scenes: list[BenchScene], benchmark: str, mode: str, views: int,
                samples: int | None, seed: int, max_gap: int = 100, every: int = 1
                ) -> list[tuple[BenchScene, str, list[int]]]:
    """``(scene, key, frame indices)`` of every sample, deterministic for ``seed``.

    ``samples`` is the total number of samples (``N @ Dataset`` in Fast3R's configs), spread
    over the scenes in order (sample ``k`` comes from scene ``k mod len(scenes)``); None gives
    one sample per scene. Each sample has its own generator from ``(seed, key)``.
    """
    if not scenes:
        return []
    total = len(scenes) if samples is None else samples
    plan = []
    for k in range(total):
        scene = scenes[k % len(scenes)]
        key = sample_key(benchmark, scene.name, k // len(scenes))
        rng = np.random.default_rng(stable_seed(seed, key))
        plan.append((scene, key, select_frames(mode, len(scene.frames), views, rng, max_gap,
                                               every)))
    return plan


# ---------------------------------------------------------------------------------------------
# Loading at the grid
# ---------------------------------------------------------------------------------------------
def grid_size(src_hw: tuple[int, int], long_side: int, multiple: int) -> tuple[int, int]:
    """The evaluation grid of a source size: long side ``long_side``, aspect kept, both sides
    multiples of ``multiple`` (:func:`distill3r.data.view.fit_size`)."""
    return fit_size(src_hw[0], src_hw[1], long_side, multiple)


def load_sample(benchmark: str, scene: BenchScene, key: str, indices: list[int],
                long_side: int, multiple: int) -> BenchSample:
    """Load the frames ``indices`` of ``scene`` and bring them to view 0's grid."""
    images, depths, Ks, poses, sources = [], [], [], [], []
    size = None
    for i in indices:
        rgb, depth, K, c2w = scene.frames[i].load()
        size = size or grid_size(rgb.shape[:2], long_side, multiple)
        tf = ViewTransform.cover(rgb.shape[:2], size)
        images.append(tf.image(rgb))
        depths.append(tf.depth(depth))
        Ks.append(tf.intrinsics(K))
        poses.append(np.asarray(c2w, np.float64))
        sources.append(rgb)
    return BenchSample(benchmark=benchmark, scene=scene.name, key=key,
                       frames=[scene.frames[i].label for i in indices], images=np.stack(images),
                       depth=np.stack(depths).astype(np.float32), K=np.stack(Ks),
                       c2w=np.stack(poses), sources=sources)
