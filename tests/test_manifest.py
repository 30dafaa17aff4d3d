"""Manifest building: sources, stable splits, resizing with K, bad input and the stage CLIs."""

from __future__ import annotations

import json
import logging
import re
import runpy
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from distill3r.config import DataParams, DemoParams, SourceParams
from distill3r.data.build import assign_splits, build_manifest
from distill3r.data.demo import render_demo
from distill3r.data.io import read_depth, read_image, write_image
from distill3r.data.manifest import COLUMNS, group_scenes, read_manifest
from distill3r.data.sources import SOURCES, Scene, SceneRef, Source, make_source
from distill3r.geometry import depth_to_camera_points, project

SIZE, VIEWS = 96, 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "demo"
    render_demo(root, DemoParams(num_scenes=3, views_per_scene=VIEWS, height=SIZE, width=SIZE,
                                 seed=5, workers=0), progress=False)
    return root


def data_params(root, kind="demo", **kw) -> DataParams:
    return DataParams(sources=[SourceParams(kind=kind, root=str(root))], **kw)


def make_images(root: Path, scenes: dict[str, list[str]], size=(24, 32)) -> Path:
    """A folder-of-scenes tree; names ending in .png/.jpg get a random image."""
    rng = np.random.default_rng(0)
    for scene, files in scenes.items():
        (root / scene).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.endswith((".png", ".jpg")):
                write_image(root / scene / name, rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            else:
                (root / scene / name).write_text("not an image")
    return root


def test_rows_reference_the_demo_frames_in_place(demo_root, tmp_path):
    out = tmp_path / "manifest.csv"
    report = build_manifest(data_params(demo_root, val_fraction=0.34), out, tmp_path / "images",
                            report_path=tmp_path / "report.json")
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    records = read_manifest(out)
    assert len(records) == 3 * VIEWS and report["frames"] == 3 * VIEWS
    assert report["resized_frames"] == 0 and not any((tmp_path / "images").iterdir())
    assert json.loads((tmp_path / "report.json").read_text()) == report
    for (dataset, split, scene), frames in group_scenes(records).items():
        cams = json.loads((demo_root / scene / "cameras.json").read_text())["frames"]
        assert dataset == "demo" and [r.frame for r in frames] == list(range(VIEWS))
        for r, cam in zip(frames, cams):
            assert r.image.resolve() == (demo_root / scene / cam["image"]).resolve()
            assert r.depth.resolve() == (demo_root / scene / cam["depth"]).resolve()
            np.testing.assert_array_equal(r.K, np.array(cam["K"]))  # exact float round trip
            np.testing.assert_array_equal(r.c2w, np.array(cam["c2w"]))
    counts = report["splits"]
    assert counts["train"]["scenes"] + counts["val"]["scenes"] == 3
    assert counts["val"]["scenes"] >= 1 and counts["train"]["scenes"] >= 1
    again = tmp_path / "again.csv"
    build_manifest(data_params(demo_root, val_fraction=0.34), again, tmp_path / "images")
    assert again.read_text() == out.read_text()  # deterministic


def test_splits_are_stable_per_scene():
    keys = [("ds", f"scene_{i:04d}") for i in range(400)]
    split = assign_splits(keys, 0.2, "salt")
    assert 0.14 < sum(s == "val" for s in split.values()) / len(keys) < 0.26
    subset = keys[::3]  # removing scenes never moves the others
    assert assign_splits(subset, 0.2, "salt") == {k: split[k] for k in subset}
    assert assign_splits(keys, 0.2, "other") != split  # the salt reshuffles
    larger = assign_splits(keys, 0.4, "salt")  # a larger fraction only adds val scenes
    assert all(larger[k] == "val" for k in keys if split[k] == "val")


def test_val_fraction_edges():
    keys = [("ds", name) for name in ("a", "b", "c")]
    assert set(assign_splits(keys, 0.0, "s").values()) == {"train"}
    assert set(assign_splits(keys, 1.0, "s").values()) == {"val"}
    assert sorted(assign_splits(keys, 1e-9, "s").values()) == ["train", "train", "val"]
    assert sorted(assign_splits(keys, 1 - 1e-9, "s").values()) == ["train", "val", "val"]
    assert assign_splits(keys[:1], 1e-9, "s") == {keys[0]: "train"}  # one scene: no forcing


def test_resize_scales_K_and_depth_consistently(demo_root, tmp_path):
    report = build_manifest(data_params(demo_root, resize_max=SIZE // 3), tmp_path / "m.csv",
                            tmp_path / "images")
    assert report["resized_frames"] == 3 * VIEWS
    for r in read_manifest(tmp_path / "m.csv"):
        raw = demo_root / r.scene
        cam = json.loads((raw / "cameras.json").read_text())["frames"][r.frame]
        K0, c2w = np.array(cam["K"]), np.array(cam["c2w"])
        assert r.image.is_relative_to((tmp_path / "images" / "demo" / r.scene).resolve())
        assert read_image(r.image).shape == (32, 32, 3)
        depth = read_depth(r.depth)
        assert depth.shape == (32, 32) and depth.min() > 0
        np.testing.assert_allclose(r.K, [[K0[0, 0] / 3, 0, (K0[0, 2] + 0.5) / 3 - 0.5],
                                         [0, K0[1, 1] / 3, (K0[1, 2] + 0.5) / 3 - 0.5],
                                         [0, 0, 1]])
        np.testing.assert_array_equal(r.c2w, c2w)
        # back-project the resized depth with the manifest K, compare with the raw view's depth
        depth0 = read_depth(raw / cam["depth"])
        for K, ok in ((r.K, True), (K0, False)):  # the unscaled K must fail the same check
            u, v, z = project(depth_to_camera_points(depth, K), K0)
            ref = cv2.remap(depth0, u.astype(np.float32), v.astype(np.float32), cv2.INTER_LINEAR)
            inside = (u >= 0) & (u <= SIZE - 1) & (v >= 0) & (v <= SIZE - 1)
            err = np.median(np.abs(ref[inside] - z[inside]) / z[inside]) if inside.any() else 1.0
            assert (err < 0.02) == ok, (r.scene, r.frame, err)


def test_interrupted_rebuild_keeps_the_written_files_whole(demo_root, tmp_path, monkeypatch):
    import distill3r.data.build as build

    params = data_params(demo_root, resize_max=SIZE // 3)
    build_manifest(params, tmp_path / "m.csv", tmp_path / "images")
    before = {p: p.read_bytes() for p in (tmp_path / "images").rglob("*") if p.is_file()}

    def dies_midway(path, depth):
        Path(path).write_bytes(b"half a PNG")
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "write_depth_png", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        build_manifest(params, tmp_path / "m.csv", tmp_path / "images")
    after = {p: p.read_bytes() for p in (tmp_path / "images").rglob("*") if p.is_file()}
    assert after == before  # no half-written file, no temporary left behind
    for r in read_manifest(tmp_path / "m.csv"):
        assert read_depth(r.depth).shape == (32, 32)


def test_images_source_sorted_warned_and_resized(tmp_path, caplog):
    root = make_images(tmp_path / "photos", {"kitchen": ["b.png", "a.jpg", "notes.txt", "c.png"],
                                             "hall": ["0.png", "1.png"]}, size=(60, 100))
    (root / "loose.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        report = build_manifest(data_params(root, "images", resize_max=50, val_fraction=0.5),
                                tmp_path / "m.csv", tmp_path / "images")
    assert any("notes.txt" in w for w in report["warnings"])
    assert any("loose.txt" in w for w in report["warnings"]) and "notes.txt" in caplog.text
    groups = {scene: frames for (_, _, scene), frames in group_scenes(
        read_manifest(tmp_path / "m.csv")).items()}
    assert sorted(groups) == ["hall", "kitchen"]
    kitchen = groups["kitchen"]
    assert [r.frame for r in kitchen] == [0, 1, 2]
    assert [r.image.name for r in kitchen] == ["000000.jpg", "000001.png", "000002.png"]
    for r in kitchen:
        assert r.depth is None and r.K is None and r.c2w is None
        assert read_image(r.image).shape == (30, 50, 3)
    assert {r.split for frames in groups.values() for r in frames} == {"train", "val"}


def test_sample_frac_keeps_a_stable_nested_subset(tmp_path):
    root = make_images(tmp_path / "many", {f"s{i:02d}": ["0.png", "1.png"] for i in range(30)},
                       size=(8, 8))

    def kept(frac):
        params = data_params(root, "images")
        params.sources[0].sample_frac = frac
        build_manifest(params, tmp_path / "m.csv", tmp_path / "images")
        return {r.scene for r in read_manifest(tmp_path / "m.csv")}

    half, most = kept(0.5), kept(0.8)
    assert 5 <= len(half) <= 25 and half < most and kept(0.5) == half


@pytest.mark.parametrize("case", ["missing", "empty_scene", "unreadable", "no_cameras"])
def test_bad_input_names_the_path(tmp_path, case):
    kind = "images"
    if case == "missing":
        root, culprit = tmp_path / "nope", tmp_path / "nope"
    elif case == "empty_scene":
        root = make_images(tmp_path / "r", {"full": ["0.png", "1.png"], "empty": ["x.txt"]})
        culprit = root / "empty"
    elif case == "unreadable":
        root = make_images(tmp_path / "r", {"s": ["0.png", "1.png"]})
        culprit = root / "s" / "1.png"
        culprit.write_bytes(b"\x89PNG garbage")
    else:
        root, kind = tmp_path / "r", "demo"
        culprit = root / "scene_0000"
        culprit.mkdir(parents=True)
    if case == "empty_scene":  # one bad scene is skipped and reported, the others kept
        report = build_manifest(data_params(root, kind), tmp_path / "m.csv",
                                tmp_path / "images", report_path=tmp_path / "report.json")
        assert [s["scene"] for s in report["skipped"]] == ["empty"]
        assert str(culprit) in report["skipped"][0]["reason"]
        assert json.loads((tmp_path / "report.json").read_text())["skipped"] == report["skipped"]
        assert {r.scene for r in read_manifest(tmp_path / "m.csv")} == {"full"}
        return
    with pytest.raises(ValueError, match=re.escape(str(culprit))):
        build_manifest(data_params(root, kind), tmp_path / "m.csv", tmp_path / "images")


def test_short_scene_is_reported_and_skipped(tmp_path, caplog):
    root = make_images(tmp_path / "r", {"long": ["0.png", "1.png", "2.png"], "short": ["0.png"]})
    with caplog.at_level(logging.WARNING):
        report = build_manifest(data_params(root, "images", min_frames=2), tmp_path / "m.csv",
                                tmp_path / "images")
    assert report["skipped"] == [{"dataset": "images", "scene": "short",
                                  "path": str(root / "short"),
                                  "reason": "1 frame(s) < data.min_frames=2"}]
    assert "short" in caplog.text
    assert {r.scene for r in read_manifest(tmp_path / "m.csv")} == {"long"}


def test_registry_and_duplicate_scenes(tmp_path):
    assert {"demo", "images"} <= set(SOURCES)
    with pytest.raises(ValueError, match=r"data.sources\[0\]: unknown kind 'nope'"):
        make_source(SourceParams(kind="nope", root=str(tmp_path)), "data.sources[0]")

    class OneScene(Source):  # a new dataset is two methods
        kind = "test-one"

        def find_scenes(self):
            return [SceneRef("x", self.root)]

        def read_scene(self, ref):
            return Scene(ref.name, ref.path, [])

    source = OneScene(tmp_path)
    assert source.scenes() == []
    assert "empty scene x" in source.skipped[0]["reason"]
    root = make_images(tmp_path / "r", {"s": ["0.png", "1.png"]})
    params = DataParams(sources=[SourceParams(kind="images", root=str(root))] * 2)
    with pytest.raises(ValueError, match="distinct names"):
        build_manifest(params, tmp_path / "m.csv", tmp_path / "images")
    params.sources = [SourceParams(kind="images", root=str(root), name=n) for n in ("a", "b")]
    assert build_manifest(params, tmp_path / "m.csv", tmp_path / "images")["scenes"] == 2


def test_stage_clis_render_and_list(tmp_path):
    params = {"demo": {"num_scenes": 2, "views_per_scene": 2, "height": 28, "width": 28,
                       "workers": 0},
              "data": {"sources": [{"kind": "demo", "root": str(tmp_path / "raw")}]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = str(tmp_path / "params.yaml")
    assert runpy.run_path(str(REPO / "stages/render_demo.py"))["main"](
        ["--params", p, "--out", str(tmp_path / "raw"), "--no-progress"]) == 0
    assert runpy.run_path(str(REPO / "stages/manifest.py"))["main"](
        ["--params", p, "--out", str(tmp_path / "manifest.csv"), "--images-dir",
         str(tmp_path / "images"), "--report", str(tmp_path / "report.json")]) == 0
    assert len(read_manifest(tmp_path / "manifest.csv")) == 4
    assert json.loads((tmp_path / "report.json").read_text())["scenes"] == 2


def test_bad_data_params_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.val_fraction"):
        build_manifest(data_params(tmp_path, val_fraction=1.5), tmp_path / "m.csv", tmp_path)
    params = data_params(tmp_path)
    params.sources[0].sample_frac = 0.0
    with pytest.raises(ValueError, match=r"data.sources\[0\].sample_frac"):
        build_manifest(params, tmp_path / "m.csv", tmp_path)
