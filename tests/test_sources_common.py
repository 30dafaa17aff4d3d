"""The source interface on the demo layout: the shared geometry check, per-scene skipping,
options, and frame orderings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dataset_fixtures import (TOLERANCE, build, check_images, geometry_error, render_truth,
                              scene_records)

from distill3r.config import SourceParams
from distill3r.data.ordering import chain_order, pose_distance
from distill3r.data.sources import SceneRef, Source, make_source, register_source
from distill3r.geometry import invert_pose


@pytest.fixture(scope="module")
def truth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("truth") / "demo"
    return root, render_truth(root, num_scenes=2, views=4)


def test_demo_source_matches_its_own_geometry(truth_root, tmp_path):
    root, truth = truth_root
    csv, report = build(tmp_path, "demo", root)
    assert report["scenes"] == 2 and not report["skipped"]
    for scene in truth:
        records = scene_records(csv, scene.name)
        check_images(records, scene.frames, lossy=False)
        assert geometry_error(records, scene.frames) < TOLERANCE


def test_geometry_check_rejects_a_wrong_pose_convention(truth_root, tmp_path):
    root, truth = truth_root
    csv, _ = build(tmp_path, "demo", root)
    records = scene_records(csv, truth[0].name)
    for wrong in (lambda T: invert_pose(T), lambda T: T @ np.diag([1.0, -1, -1, 1])):
        for r in records:
            r.c2w = wrong(r.c2w)
        assert geometry_error(records, truth[0].frames) > 10 * TOLERANCE
        records = scene_records(csv, truth[0].name)


def test_bad_scene_is_skipped_reported_and_the_others_kept(truth_root, tmp_path):
    root, truth = truth_root
    bad = tmp_path / "raw"
    for scene in truth:
        (bad / scene.name).mkdir(parents=True)
        for f in (root / scene.name).rglob("*"):
            target = bad / scene.name / f.relative_to(root / scene.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.is_file():
                target.write_bytes(f.read_bytes())
    cams = bad / truth[1].name / "cameras.json"
    meta = json.loads(cams.read_text())
    meta["frames"][2]["depth"] = meta["frames"][0]["depth"].replace("0000", "9999")
    cams.write_text(json.dumps(meta))
    csv, report = build(tmp_path, "demo", bad)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == truth[1].name and "depth file not found" in skipped["reason"]
    assert "9999" in skipped["reason"] and truth[1].name in skipped["reason"]
    assert report["datasets"]["demo"]["scenes_unreadable"] == 1
    assert {r.scene for r in scene_records(csv, truth[0].name)} == {truth[0].name}
    saved = json.loads((tmp_path / "manifest" / "report.json").read_text())
    assert saved["skipped"] == report["skipped"]


def test_source_options_are_typed(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Opts:
        depth_dir: str = "depth"
        limit: int = 3

    @register_source
    class WithOptions(Source):
        kind = "test-options"
        Options = Opts

        def find_scenes(self):
            return [SceneRef("a", self.root)]

        def read_scene(self, ref):
            raise ValueError("unused")

    src = make_source(SourceParams(kind="test-options", root=str(tmp_path),
                                   options={"limit": 5}))
    assert src.options == Opts(limit=5)
    with pytest.raises(ValueError, match=r"data.sources\[2\].options: unknown key\(s\) nope"):
        make_source(SourceParams(kind="test-options", root=str(tmp_path), options={"nope": 1}),
                    "data.sources[2]")
    with pytest.raises(ValueError, match=r"options.limit: expected an integer"):
        make_source(SourceParams(kind="test-options", root=str(tmp_path),
                                 options={"limit": "x"}))


def test_chain_order_follows_affinity_and_is_deterministic():
    # five cameras on a line, listed out of order: the chain walks the line from one end
    xs = np.array([3.0, 0.0, 4.0, 1.0, 2.0])
    c2w = np.repeat(np.eye(4)[None], 5, axis=0)
    c2w[:, 0, 3] = xs
    order = chain_order(-pose_distance(c2w))
    walked = xs[order]
    assert sorted(order) == list(range(5))
    assert np.all(np.abs(np.diff(walked)) == 1.0)  # every step goes to an adjacent camera
    assert chain_order(-pose_distance(c2w)) == order
    # disconnected groups: each group stays contiguous
    a = np.full((4, 4), -np.inf)
    a[0, 2] = a[2, 0] = 1.0
    a[1, 3] = a[3, 1] = 2.0
    order = chain_order(a)
    assert {frozenset(order[:2]), frozenset(order[2:])} == {frozenset({0, 2}), frozenset({1, 3})}


def test_pose_distance_counts_rotation():
    c2w = np.repeat(np.eye(4)[None], 3, axis=0)
    c2w[1, 0, 3] = 1.0
    c2w[2, :3, :3] = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # turned 90 degrees
    d = pose_distance(c2w)
    assert d[0, 2] == pytest.approx(np.pi / 2) and d[0, 1] > 0
    np.testing.assert_allclose(d, d.T)


def test_image_size_other_than_the_cameras_skips_the_scene(truth_root, tmp_path):
    """A dataset whose camera says another size than the image file (e.g. downscaled images
    with the full-size model) must not get a silently wrong K."""
    from distill3r.data.sources.simple import DemoSource

    root, truth = truth_root

    @register_source
    class WrongSize(DemoSource):
        kind = "test-wrong-size"

        def read_scene(self, ref):
            scene = super().read_scene(ref)
            if ref.name == truth[1].name:
                for f in scene.frames:
                    f.size = (96, 128)  # the truth is 48x64
            return scene

    csv, report = build(tmp_path, "test-wrong-size", root)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == truth[1].name
    assert "image is 64x48 but the dataset's camera is 128x96" in skipped["reason"]
    assert scene_records(csv, truth[0].name)


def test_skip_frame_drops_one_frame_and_keeps_the_scene(truth_root, tmp_path):
    from distill3r.data.sources import SkipFrame
    from distill3r.data.sources.simple import DemoSource

    root, truth = truth_root

    @register_source
    class MaskedFrames(DemoSource):
        kind = "test-skip-frame"

        def read_depth(self, frame):
            if frame.frame == 1 and frame.depth.parent.parent.name == truth[0].name:
                raise SkipFrame(f"{frame.depth}: a mask, not depth")
            return super().read_depth(frame)

    csv, report = build(tmp_path, "test-skip-frame", root)
    assert not report["skipped"] and report["frames"] == 3 + 4
    assert [r.frame for r in scene_records(csv, truth[0].name)] == [0, 2, 3]
    assert any("1 frame(s) dropped" in w and "a mask, not depth" in w
               for w in report["warnings"])
    csv, report = build(tmp_path / "strict", "test-skip-frame", root, min_frames=4)
    (skipped,) = report["skipped"]
    assert skipped["scene"] == truth[0].name and report["scenes"] == 1
    assert skipped["reason"] == "3 usable frame(s) < data.min_frames=4"
