"""The viewer of infer outputs: reading them, the live viser scene driven from Python, and both
pages (live server on loopback, static HTML) rendered by headless Chromium with every other host
unresolvable. The browser tests need Debian's chromium (`.ci/run` installs it); they are
skipped where it is missing outside CI."""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from browser import CHROMIUM, chromium_page
from distill3r.config import InferParams
from distill3r.data.io import write_image
from distill3r.export import ply_writer, read_ply_vertices, write_ply
from distill3r.inference import PLY_EXTRA, run_inference
from distill3r.jsonio import write_json
from distill3r.models import build_student, save_student
from distill3r.viewer import app
from distill3r.viewer.cli import main
from distill3r.viewer.scene import (ViewerInputError, confidence_threshold, find_scene_files,
                                    load_view_scene)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="needs Debian's chromium (.ci/run installs it)")
DRAWN = "window.__viserTestpoints && window.__viserTestpoints.rendererInfo.render.points"


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    """Infer outputs of one 4-view scene of smooth colour gradients (tiny random student)."""
    root = tmp_path_factory.mktemp("viewer")
    torch.manual_seed(0)
    ckpt = save_student(build_student("tiny"), root / "student")
    yy, xx = np.mgrid[0:84, 0:112]
    for i in range(4):
        image = np.stack([xx * 2, yy * 3, np.full_like(xx, 60 * i)], -1).clip(0, 255)
        write_image(root / "room" / f"{i:03d}.png", image.astype(np.uint8))
    params = InferParams(size=56, device="cpu", dtype="fp32", preview_views=1, conf_percentile=0)
    run_inference(root / "room", ckpt, root / "out", params)
    return root / "out"


@pytest.fixture(scope="module")
def room(tmp_path_factory) -> Path:
    """Infer outputs of a known scene (written as infer writes them): the back wall (z = 3,
    checkered) and floor (y = 1) of a room seen by 4 cameras from view 0's side; the
    confidence grows from left to right (x), so a high percentile keeps the right part."""
    out = tmp_path_factory.mktemp("room")
    u, v = np.meshgrid(np.linspace(-2, 2, 160), np.linspace(-1, 1, 80))
    wall = np.stack([u, v, np.full_like(u, 3.0)], -1).reshape(-1, 3)
    floor = np.stack([u, np.ones_like(u), 2 + v], -1).reshape(-1, 3)
    points = np.concatenate([wall, floor]).astype(np.float32)
    checker = ((np.floor(points[:, 0] * 2) + np.floor(points[:, 1] * 2 + points[:, 2] * 2)) % 2)
    colors = np.where(checker[:, None] > 0, [200, 60, 40], [40, 90, 200]).astype(np.uint8)
    view = (np.arange(len(points)) * 4 // len(points)).astype(np.int32)
    with ply_writer(out / "room_student.ply", len(points), extra=PLY_EXTRA) as ply:
        ply.write(points, colors, confidence=(points[:, 0] + 3).astype(np.float32), view=view)
    K = [[60.0, 0, 40], [0, 60.0, 30], [0, 0, 1]]
    c2w = [np.eye(4) for _ in range(4)]
    for i, pose in enumerate(c2w):
        pose[0, 3] = 0.3 * i
    write_json(out / "room_cameras.json", {
        "scene": "room", "width": 80, "height": 60,
        "frames": [{"frame": i, "image": f"{i}.png", "K": K, "c2w": c2w[i].tolist()}
                   for i in range(4)]})
    write_json(out / "room_info.json", {"scene": "room", "views": 4, "conf_percentile": 0})
    return out


def _non_background(path: Path) -> int:
    """Pixels of the 3D canvas that differ from viser's white background (the GUI panel on
    the right and the notification on the left are cut off)."""
    image = cv2.imread(str(path))
    assert image is not None, f"{path}: no screenshot"
    canvas = image[150:-70, 330:-340].astype(int)
    return int((np.abs(canvas - 255).sum(-1) > 30).sum())


def test_scene_files_are_found_from_folder_file_or_prefix(output, tmp_path):
    by_folder = find_scene_files(output)
    assert by_folder.name == "room"
    assert find_scene_files(output / "room_student.ply") == by_folder
    assert find_scene_files(output / "room") == by_folder
    assert find_scene_files(output, scene="room") == by_folder
    with pytest.raises(ViewerInputError, match="no scene 'hall'"):
        find_scene_files(output, scene="hall")
    with pytest.raises(ViewerInputError, match="no infer outputs"):
        find_scene_files(tmp_path)
    write_ply(tmp_path / "old_student.ply", np.zeros((2, 3), np.float32), np.zeros((2, 3), np.uint8))
    for name in ("old_cameras.json", "old_info.json"):
        (tmp_path / name).write_text((output / name.replace("old", "room")).read_text())
    with pytest.raises(ViewerInputError, match="lack confidence, view .*run infer again"):
        load_view_scene(find_scene_files(tmp_path))
    assert main([str(tmp_path / "nothing")]) == 1


def test_loaded_scene_matches_the_ply_and_caps_points(output):
    scene = load_view_scene(find_scene_files(output))
    vertices = read_ply_vertices(output / "room_student.ply")
    assert scene.num_views == 4 and scene.size == (42, 56)
    assert len(scene.points) == scene.total_points == len(vertices["x"])
    assert np.array_equal(scene.confidence, vertices["confidence"])
    assert all(t is not None and t.shape == (42, 56, 3) for t in scene.thumbnails)
    capped = load_view_scene(find_scene_files(output), max_points=100)
    assert len(capped.points) == 100 and set(capped.view.tolist()) <= {0, 1, 2, 3}
    assert confidence_threshold(scene.confidence, 0) == -np.inf


def test_live_slider_and_toggles_set_the_clouds_drawn(output):
    scene = load_view_scene(find_scene_files(output))
    server, viewer = app.serve(scene, port=0)
    try:
        assert viewer.points_drawn() == len(scene.points)
        viewer.percentile.value = 50  # what moving the slider in a browser does
        threshold = np.percentile(scene.confidence, 50)
        assert viewer.points_drawn() == int((scene.confidence >= threshold).sum())
        for i, cloud in enumerate(viewer.clouds):  # each view's own points above it
            mine = (scene.view == i) & (scene.confidence >= threshold)
            assert np.array_equal(cloud.points, scene.points[mine])
        viewer.views[2].value = False
        assert not viewer.clouds[2].visible and not viewer.cameras[2].visible
        assert viewer.points_drawn() == int(((scene.confidence >= threshold)
                                             & (scene.view != 2)).sum())
    finally:
        server.stop()


@needs_chromium
@pytest.mark.slow
def test_live_page_draws_the_cloud_and_the_slider_changes_it(room, tmp_path):
    scene = load_view_scene(find_scene_files(room))
    server, viewer = app.serve(scene, port=0)
    try:
        with chromium_page(tmp_path) as page:
            page.goto(f"http://127.0.0.1:{server.get_port()}")
            # three.js counts the points of the last frame it drew (renderer.info.render)
            page.wait_for(f"{DRAWN} === {len(scene.points)}", timeout=90)
            viewer.show_cameras.value = False  # the screenshots show the points alone
            time.sleep(2.0)
            full = _non_background(page.screenshot(tmp_path / "p0.png"))
            viewer.percentile.value = 90
            expected = int((scene.confidence >= np.percentile(scene.confidence, 90)).sum())
            assert viewer.points_drawn() == expected <= len(scene.points) / 9
            page.wait_for(f"{DRAWN} === {expected}", timeout=30)
            time.sleep(2.0)
            fewer = _non_background(page.screenshot(tmp_path / "p90.png"))
    finally:
        server.stop()
    assert full > 30_000, full  # the cloud covers a good part of the canvas
    assert fewer < 0.8 * full, (full, fewer)


@needs_chromium
@pytest.mark.slow
def test_static_html_draws_offline_and_its_timeline_is_the_percentile(room, tmp_path):
    still, timeline = tmp_path / "still.html", tmp_path / "timeline.html"
    assert main([str(room), "--static", str(still), "--steps", "1"]) == 0
    assert main([str(room), "--static", str(timeline), "--steps", "4"]) == 0
    html = timeline.read_text()
    assert "__VISER_EMBED_DATA__" in html and "<script src=\"http" not in html
    scene = load_view_scene(find_scene_files(room))
    with chromium_page(tmp_path, allow_hosts=()) as page:  # file:// only, no host resolves
        page.goto(still.as_uri())
        page.wait_for(f"{DRAWN} === {len(scene.points)}", timeout=90)
        time.sleep(2.0)  # the page fades in
        page.screenshot(tmp_path / "static.png")
        page.goto(timeline.as_uri())
        page.wait_for(DRAWN, timeout=90)
        drawn = set()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:  # one pass of the 4 s timeline at least
            drawn.add(page.evaluate(DRAWN))
            time.sleep(0.1)
    assert _non_background(tmp_path / "static.png") > 30_000
    assert max(drawn) == len(scene.points)  # band 0 (all points) ...
    assert min(v for v in drawn if v) < 0.4 * len(scene.points)  # ... to the top quarter
