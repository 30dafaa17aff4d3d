"""View sampling: the "nearby" mode, per-dataset overrides, their errors and the cache plan."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from distill3r.cache.writer import plan_cache
from distill3r.config import CacheParams, DatasetSampling, Params, TeacherParams, from_dict
from distill3r.data.manifest import FrameRecord, group_scenes, write_manifest
from distill3r.data import sampling
from sampling_helpers import sample_views
from distill3r.teachers import get_teacher


def _c2w(x: float) -> np.ndarray:
    """A camera at ``(x, 0, 0)`` looking along +z (all cameras of a line share a direction)."""
    pose = np.eye(4)
    pose[0, 3] = x
    return pose


def _frames(dataset: str, scene: str, n: int, xs=None, step: int = 1) -> list[FrameRecord]:
    """``n`` frames numbered ``0, step, 2*step, ...``; frame ``i`` at ``x = xs[i]`` if given."""
    return [FrameRecord(dataset, "train", scene, i * step, Path(f"/x/{scene}/{i}.png"),
                        c2w=None if xs is None else _c2w(float(xs[i]))) for i in range(n)]


def _ids(samples, scene: str | None = None) -> list[list[int]]:
    return [s.frame_ids for s in samples if scene is None or s.scene == scene]


def _span(values) -> int:
    return int(max(values) - min(values))


# ---------------------------------------------------------------------------------------------
# nearby
# ---------------------------------------------------------------------------------------------
def test_nearby_with_poses_keeps_samples_around_their_anchor():
    line = group_scenes(_frames("d", "a", 40, xs=np.arange(40)))
    samples, _ = sample_views(line, 3, 12, "nearby", neighbours=4, seed=2)
    assert len(samples) == 12 and len({tuple(f) for f in _ids(samples)}) == 12
    # the 4 nearest cameras on a line lie within 2 positions each side (4 at an end)
    assert all(_span(f) <= 4 and f == sorted(f) and len(set(f)) == 3 for f in _ids(samples))
    perm = np.random.default_rng(0).permutation(40)  # frame i sits at x = perm[i]
    shuffled = group_scenes(_frames("d", "a", 40, xs=perm))
    samples, _ = sample_views(shuffled, 3, 12, "nearby", neighbours=4, seed=2)
    assert all(_span(perm[f]) <= 4 for f in _ids(samples))  # neighbours by pose ...
    assert max(_span(f) for f in _ids(samples)) > 4  # ... not by frame order


def test_nearby_without_every_pose_uses_frame_order():
    perm = np.random.default_rng(0).permutation(40)
    frames = _frames("d", "a", 40, xs=perm, step=10)
    frames[17].c2w = None  # one frame without a pose: the whole scene falls back
    samples, _ = sample_views(group_scenes(frames), 3, 12, "nearby", neighbours=4, seed=2)
    positions = [[f // 10 for f in ids] for ids in _ids(samples)]
    assert len(positions) == 12 and all(_span(p) <= 4 for p in positions)
    assert max(_span(perm[p]) for p in positions) > 4  # the poses were not used


def test_nearby_large_neighbourhoods_and_large_posed_scenes(monkeypatch):
    # C(16, 7) subsets per anchor: drawn at random instead of enumerated
    samples, _ = sample_views(group_scenes(_frames("d", "a", 60)), 8, 10, "nearby",
                              neighbours=16, seed=3)
    assert len({tuple(f) for f in _ids(samples)}) == len(samples) == 10
    assert all(_span(f) <= 16 and len(set(f)) == 8 for f in _ids(samples))
    many, _ = sample_views(group_scenes(_frames("d", "a", 17)), 8, 3000, "nearby",
                           neighbours=16)  # ~180 birthday collisions among C(17, 8) subsets
    assert len({tuple(f) for f in _ids(many)}) == len(many) == 3000
    monkeypatch.setattr(sampling, "POSE_FRAMES_LIMIT", 30)
    perm = np.random.default_rng(0).permutation(40)
    with pytest.warns(UserWarning, match=r"1 scene.*more than 30 frames.*frame order.*d/a"):
        samples, _ = sample_views(group_scenes(_frames("d", "a", 40, xs=perm)), 3, 12,
                                  "nearby", neighbours=4, seed=2)
    assert all(_span(f) <= 4 for f in _ids(samples))
    assert max(_span(perm[f]) for f in _ids(samples)) > 4


@pytest.mark.parametrize("seed", range(5))
def test_nearby_anchors_spread_over_the_scene(seed):
    samples, _ = sample_views(group_scenes(_frames("d", "a", 40)), 3, 4, "nearby",
                              neighbours=4, seed=seed)
    # anchor k is drawn from frames [10k, 10k+10); its sample stays within 4 frames of it
    for k, ids in enumerate(_ids(samples)):
        assert 10 * k - 4 <= min(ids) and max(ids) <= 10 * k + 13, (k, ids)


def test_nearby_stops_when_every_distinct_subset_is_used():
    samples, skipped = sample_views(group_scenes(_frames("d", "a", 5)), 3, 10, "nearby",
                                    neighbours=2)
    assert sorted(_ids(samples)) == [[0, 1, 2], [1, 2, 3], [2, 3, 4]] and skipped == []
    every, _ = sample_views(group_scenes(_frames("d", "a", 6)), 3, 100, "nearby", neighbours=5)
    assert len({tuple(f) for f in _ids(every)}) == len(every) == 20  # C(6, 3)


def test_nearby_is_deterministic_and_independent_of_other_scenes():
    def scenes(*names):
        frames = [r for name in names for r in _frames("d", name, 30 + len(name))]
        return group_scenes(frames)

    a, _ = sample_views(scenes("a", "bb"), 4, 6, "nearby", neighbours=6, seed=1)
    b, _ = sample_views(scenes("0", "bb", "a", "ccc"), 4, 6, "nearby", neighbours=6, seed=1)
    again, _ = sample_views(scenes("a", "bb"), 4, 6, "nearby", neighbours=6, seed=1)
    assert _ids(a, "a") == _ids(b, "a") and _ids(a, "bb") == _ids(b, "bb")
    assert _ids(a) == _ids(again)
    other, _ = sample_views(scenes("a", "bb"), 4, 6, "nearby", neighbours=6, seed=2)
    assert _ids(other, "a") != _ids(a, "a")
    assert [s.key for s in a if s.scene == "a"] == [f"d__a__s{i:03d}" for i in range(6)]


def test_nearby_skips_scenes_with_too_few_frames():
    groups = group_scenes(_frames("d", "a", 2) + _frames("d", "b", 4))
    with pytest.warns(UserWarning, match=r"1 scene.*d/a \(2 < 3\)"):
        samples, skipped = sample_views(groups, 3, 2, "nearby", neighbours=2)
    assert {s.scene for s in samples} == {"b"}
    assert skipped == [{"dataset": "d", "split": "train", "scene": "a", "frames": 2,
                        "needed": 3}]


# ---------------------------------------------------------------------------------------------
# Per-dataset overrides
# ---------------------------------------------------------------------------------------------
def test_overrides_apply_only_to_their_dataset():
    big, small = _frames("big", "a", 30), _frames("small", "a", 10)
    groups = group_scenes(big + small)
    override = DatasetSampling("small", sampling="stride", frame_stride=2,
                               max_samples_per_scene=2)
    mixed, _ = sample_views(groups, 3, 3, "random", seed=5, overrides=[override])
    plain, _ = sample_views(group_scenes(big), 3, 3, "random", seed=5)
    assert _ids([s for s in mixed if s.dataset == "big"]) == _ids(plain)
    assert _ids([s for s in mixed if s.dataset == "small"]) == [[0, 2, 4], [5, 7, 9]]
    near = DatasetSampling("small", sampling="nearby", neighbours=2)  # max inherited: 3
    mixed, _ = sample_views(groups, 3, 3, "random", seed=5, overrides=[near])
    assert _ids([s for s in mixed if s.dataset == "big"]) == _ids(plain)
    assert sorted(_ids([s for s in mixed if s.dataset == "small"])) == \
        sorted(_ids(sample_views(group_scenes(small), 3, 3, "nearby", seed=5,
                                 neighbours=2)[0]))


def test_override_for_an_absent_dataset_only_warns():
    groups = group_scenes(_frames("d", "a", 8))
    with pytest.warns(UserWarning, match=r"dataset_sampling.*ghost.*unused"):
        samples, _ = sample_views(groups, 3, 4, seed=1,
                                  overrides=[DatasetSampling("ghost", sampling="stride")])
    assert _ids(samples) == _ids(sample_views(groups, 3, 4, seed=1)[0])


@pytest.mark.parametrize("overrides, sampling, neighbours, match", [
    ([], "nearby", 2, r"^cache\.neighbours: must be >= views_per_sample - 1 = 3 .*got 2$"),
    ([DatasetSampling("a"), DatasetSampling("b", sampling="every")], "random", 8,
     r"^cache\.dataset_sampling\[1\]\.sampling: 'every' is not one of 'random', 'stride', "
     r"'nearby'$"),
    ([DatasetSampling("a"), DatasetSampling("b"), DatasetSampling("a", sampling="stride")],
     "random", 8, r"^cache\.dataset_sampling\[2\]\.dataset: 'a' already has an override "
     r"\(cache\.dataset_sampling\[0\]\)$"),
    ([DatasetSampling("a", frame_stride=0)], "random", 8,
     r"^cache\.dataset_sampling\[0\]\.frame_stride: must be >= 1, got 0$"),
    ([DatasetSampling("a", max_samples_per_scene=0)], "random", 8,
     r"^cache\.dataset_sampling\[0\]\.max_samples_per_scene: must be >= 1"),
    ([DatasetSampling("a", sampling="nearby", neighbours=1)], "random", 8,
     r"^cache\.dataset_sampling\[0\]\.neighbours: must be >= views_per_sample - 1 = 3"),
    ([DatasetSampling("a", sampling="nearby")], "random", 2,
     r"^cache\.neighbours: .*\(inherited by cache\.dataset_sampling\[0\]\), got 2$"),
    ([DatasetSampling("")], "random", 8, r"^cache\.dataset_sampling\[0\]\.dataset: must name"),
])
def test_errors_name_the_key(overrides, sampling, neighbours, match):
    with pytest.raises(ValueError, match=match):
        sample_views(group_scenes(_frames("a", "s", 8)), 4, 2, sampling, neighbours=neighbours,
                     overrides=overrides)


def test_neighbours_are_checked_only_where_nearby_uses_them():
    groups = group_scenes(_frames("a", "s", 8) + _frames("b", "s", 8))
    samples, _ = sample_views(groups, 4, 2, "random", neighbours=1,
                              overrides=[DatasetSampling("a", sampling="stride")])
    assert len(samples) == 4


def test_dataset_sampling_loads_strictly_from_params():
    raw = {"cache": {"dataset_sampling": [{"dataset": "co3d", "sampling": "nearby",
                                           "neighbours": 12}]}}
    cache = from_dict(Params, raw).cache
    assert cache.dataset_sampling == [DatasetSampling("co3d", sampling="nearby", neighbours=12)]
    assert cache.neighbours == 8 and CacheParams().dataset_sampling == []
    with pytest.raises(ValueError, match=r"cache\.dataset_sampling\[0\]: unknown key.*stride"):
        from_dict(Params, {"cache": {"dataset_sampling": [{"dataset": "x", "stride": 2}]}})
    with pytest.raises(ValueError, match=r"dataset_sampling\[0\]: missing required key dataset"):
        from_dict(Params, {"cache": {"dataset_sampling": [{"sampling": "stride"}]}})
    with pytest.raises(ValueError,
                       match=r"dataset_sampling\[0\]\.neighbours: expected int or null, got .4."):
        from_dict(Params, {"cache": {"dataset_sampling": [{"dataset": "x", "neighbours": "4"}]}})


# ---------------------------------------------------------------------------------------------
# The cache plan
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def manifest(tmp_path):
    frames = _frames("big", "a", 12, xs=np.arange(12)) + _frames("small", "b", 10)
    path = tmp_path / "manifest.csv"
    write_manifest(frames, path)
    return path


def test_plan_refuses_ground_truth_teacher_without_depth(manifest):
    with pytest.raises(ValueError, match=r"teacher 'groundtruth' needs depth, K, c2w.*"
                                         r"big/a \(no depth, K\); small/b \(no depth, K, c2w\)"
                                         r".*teacher.name: fast3r"):
        plan_cache(manifest, CacheParams(), get_teacher(TeacherParams()))


def test_plan_applies_overrides_and_fingerprints_new_params(manifest):
    teacher = get_teacher(TeacherParams())
    teacher.requires = ()  # these frames have no depth; only the plan is under test
    base = dict(image_size=[28, 28], views_per_sample=3, max_samples_per_scene=2)
    override = DatasetSampling("small", sampling="stride", frame_stride=3)
    plan = plan_cache(manifest, CacheParams(**base, dataset_sampling=[override]), teacher)
    small = [s.frame_ids for shard in plan.shards["train"] for s in shard if s.scene == "b"]
    assert small == [[0, 3, 6], [3, 6, 9]]
    prints = {plan_cache(manifest, CacheParams(**base, **extra), teacher).fingerprint
              for extra in ({}, {"neighbours": 9}, {"dataset_sampling": [override]},
                            {"dataset_sampling": [DatasetSampling("small", frame_stride=3)]})}
    assert len(prints) == 4  # every new field changes the fingerprint, so the cache rebuilds
    assert plan_cache(manifest, CacheParams(**base), teacher).fingerprint in prints


def test_plan_checks_sampling_params_before_reading_the_manifest(tmp_path):
    cache = CacheParams(dataset_sampling=[DatasetSampling("x", sampling="every")])
    with pytest.raises(ValueError, match=r"^cache\.dataset_sampling\[0\]\.sampling"):
        plan_cache(tmp_path / "missing.csv", cache, get_teacher(TeacherParams()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="manifest not found"):
            plan_cache(tmp_path / "missing.csv", CacheParams(), get_teacher(TeacherParams()))
