"""The ``blendedmvs`` source on demo truth written in BlendedMVS's MVSNet layout: PFM depth
and translations in a non-metric scene scale, world-to-camera extrinsics, shuffled view ids and
a pair.txt that decides the frame order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import (TOLERANCE, TruthScene, build, check_images, geometry_error,
                              render_truth, scene_records, skipped_reasons)

from distill3r.data.io import write_image
from distill3r.data.ordering import chain_order, pose_distance
from distill3r.data.pfm import write_pfm
from distill3r.geometry import invert_pose

SCALE = 2.5  # reconstruction units per metre
NAMES = ["5b08286b2775267d5b0634ba", "5c1f33f1d33e1f2e4aa6dda4"]


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> list[TruthScene]:
    return render_truth(tmp_path_factory.mktemp("truth") / "demo", num_scenes=2, views=5)


def view_ids(n: int, seed: int) -> list[int]:
    """Shuffled, gappy view ids: truth frame i is stored as view ids[i]."""
    return [int(v) * 3 + 1 for v in np.random.default_rng(seed).permutation(n)]


def pose_scores(scene: TruthScene) -> np.ndarray:
    """Symmetric covisibility-like scores from the truth poses (higher = closer)."""
    c2w = np.stack([f.c2w for f in scene.frames])
    return np.round(100.0 / (1.0 + pose_distance(c2w)), 3)


def write_cam(path: Path, extrinsic: np.ndarray, K: np.ndarray) -> None:
    rows = ["extrinsic", *(" ".join(f"{v:.9f}" for v in r) for r in extrinsic), "",
            "intrinsic", *(" ".join(f"{v:.9f}" for v in r) for r in K), "",
            "1.0 0.05 192 10.6"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


def write_pairs(path: Path, ids: list[int], scores: np.ndarray, one_way: bool = False) -> None:
    """MVSNet pair.txt in ascending id order; ``one_way`` lists each pair under one view only."""
    lines = [str(len(ids))]
    for i in sorted(range(len(ids)), key=lambda i: ids[i]):
        others = [j for j in np.argsort(-scores[i], kind="stable") if j != i
                  and np.isfinite(scores[i, j]) and (not one_way or (i + j) % 2 == (i < j))]
        lines += [str(ids[i]), " ".join([str(len(others))]
                                        + [f"{ids[j]} {scores[i, j]:.3f}" for j in others])]
    path.write_text("\n".join(lines) + "\n")


def write_blendedmvs(root: Path, truth: list[TruthScene], w2c: bool = True,
                     scores: list[np.ndarray] | None = None, one_way: bool = False,
                     names: list[str] = NAMES) -> list[list[int]]:
    """Write ``truth`` as BlendedMVS scenes; returns each scene's view ids."""
    all_ids = []
    for s, (scene, name) in enumerate(zip(truth, names)):
        folder = root / name
        ids = view_ids(len(scene.frames), seed=s)
        for f, vid in zip(scene.frames, ids):
            stem = f"{vid:08d}"
            write_image(folder / "blended_images" / f"{stem}.jpg", f.image)
            write_image(folder / "blended_images" / f"{stem}_masked.jpg", 255 - f.image)
            c2w = f.c2w.copy()
            c2w[:3, 3] *= SCALE
            write_cam(folder / "cams" / f"{stem}_cam.txt", invert_pose(c2w) if w2c else c2w, f.K)
            write_pfm(folder / "rendered_depth_maps" / f"{stem}.pfm", f.depth * SCALE,
                      little_endian=vid % 2 == 0)
        pair_scores = pose_scores(scene) if scores is None else scores[s]
        write_pairs(folder / "cams" / "pair.txt", ids, pair_scores, one_way)
        all_ids.append(ids)
    (root / "BlendedMVS_list.txt").write_text("\n".join(names) + "\n")
    return all_ids


def stored_ids(records) -> list[int]:
    return [int(Path(r.image).stem.removesuffix("_masked")) for r in records]


def test_rows_geometry_and_pair_order(truth, tmp_path):
    ids = write_blendedmvs(tmp_path / "raw", truth)
    csv, report = build(tmp_path, "blendedmvs", tmp_path / "raw")
    assert report["scenes"] == 2 and not report["skipped"] and not report["warnings"]
    for scene, name, scene_ids in zip(truth, NAMES, ids):
        records = scene_records(csv, name)
        order = chain_order(pose_scores(scene))
        assert [r.frame for r in records] == list(range(len(scene.frames)))
        assert stored_ids(records) == [scene_ids[i] for i in order]
        assert stored_ids(records) != sorted(scene_ids)  # not just the file order
        assert {r.split for r in records} == {"train"}
        frames = [scene.frames[i] for i in order]
        check_images(records, frames, lossy=True)
        assert geometry_error(records, frames, scale=SCALE) < TOLERANCE


def test_order_follows_pair_txt_not_the_poses(truth, tmp_path):
    rng = np.random.default_rng(5)
    scores = []
    for scene in truth:
        n = len(scene.frames)
        s = np.round(rng.uniform(1, 100, (n, n)), 3)
        scores.append(np.maximum(s, s.T))
    ids = write_blendedmvs(tmp_path / "raw", truth, scores=scores, one_way=True)
    csv, _ = build(tmp_path, "blendedmvs", tmp_path / "raw")
    for scene, name, scene_ids, s in zip(truth, NAMES, ids, scores):
        order = chain_order(s)
        assert order != chain_order(-pose_distance(np.stack([f.c2w for f in scene.frames])))
        records = scene_records(csv, name)
        assert stored_ids(records) == [scene_ids[i] for i in order]
        assert geometry_error(records, [scene.frames[i] for i in order],
                              scale=SCALE) < TOLERANCE


def test_without_pair_txt_the_poses_order_frames_with_a_warning(truth, tmp_path):
    ids = write_blendedmvs(tmp_path / "raw", truth)
    (tmp_path / "raw" / NAMES[1] / "cams" / "pair.txt").unlink()
    csv, report = build(tmp_path, "blendedmvs", tmp_path / "raw")
    (warning,) = report["warnings"]
    assert "pair.txt" in warning and NAMES[1] in warning
    order = chain_order(-pose_distance(np.stack([f.c2w for f in truth[1].frames])))
    assert stored_ids(scene_records(csv, NAMES[1])) == [ids[1][i] for i in order]


def test_world_to_camera_is_required(truth, tmp_path):
    write_blendedmvs(tmp_path / "raw", truth, w2c=False)  # the mistake: c2w as extrinsic
    csv, _ = build(tmp_path, "blendedmvs", tmp_path / "raw")
    for scene, name in zip(truth, NAMES):
        records = scene_records(csv, name)
        frames = [scene.frames[i] for i in chain_order(pose_scores(scene))]
        assert geometry_error(records, frames, scale=SCALE) > 10 * TOLERANCE


def test_masked_images_are_skipped_or_used(truth, tmp_path):
    ids = write_blendedmvs(tmp_path / "raw", truth)
    csv, _ = build(tmp_path, "blendedmvs", tmp_path / "raw", {"skip_masked": False})
    records = scene_records(csv, NAMES[0])
    assert all(Path(r.image).stem.endswith("_masked") for r in records)
    order = chain_order(pose_scores(truth[0]))
    assert stored_ids(records) == [ids[0][i] for i in order]
    inverted = [truth[0].frames[i] for i in order]
    inverted = [type(f)(f.index, 255 - f.image, f.depth, f.K, f.c2w) for f in inverted]
    check_images(records, inverted, lossy=True)


def _break(folder: Path, ids: list[int], how: str) -> Path:
    stem = f"{ids[2]:08d}"
    cam, pfm = folder / "cams" / f"{stem}_cam.txt", folder / "rendered_depth_maps" / f"{stem}.pfm"
    if how == "no cam":
        cam.unlink()
        return cam
    if how == "bad cam":
        cam.write_text(cam.read_text().replace("intrinsic", "intrinsics:"))
        return cam
    if how == "bad rotation":
        text = cam.read_text().splitlines()
        text[1] = "2 0 0 0"
        cam.write_text("\n".join(text))
        return cam
    if how == "bad pair":
        pair = folder / "cams" / "pair.txt"
        pair.write_text("9\n" + pair.read_text().split("\n", 1)[1])
        return pair
    if how == "small pfm":
        write_pfm(pfm, np.ones((24, 32), np.float32))
        return pfm
    if how == "bad pfm":
        pfm.write_bytes(b"P5\n" + pfm.read_bytes()[3:])
        return pfm
    raise AssertionError(how)


BROKEN = ["no cam", "bad cam", "bad rotation", "bad pair", "small pfm", "bad pfm"]


def test_bad_scenes_are_skipped_and_named(truth, tmp_path):
    names = [NAMES[0]] + [f"broken_{i}" for i in range(len(BROKEN))]
    scenes = [truth[0]] + [truth[1]] * len(BROKEN)
    all_ids = write_blendedmvs(tmp_path / "raw", scenes, names=names)
    broken = {name: _break(tmp_path / "raw" / name, ids, how)
              for name, ids, how in zip(names[1:], all_ids[1:], BROKEN)}
    csv, report = build(tmp_path, "blendedmvs", tmp_path / "raw")
    assert report["scenes"] == 1 and len(scene_records(csv, NAMES[0])) == 5
    reasons = skipped_reasons(report, broken)
    assert "camera file not found" in reasons["broken_0"]
    assert "depth is 32x24" in reasons["broken_4"]


def test_files_that_are_not_numbered_views_are_skipped_with_a_warning(truth, tmp_path):
    write_blendedmvs(tmp_path / "raw", truth[:1])
    stray = tmp_path / "raw" / NAMES[0] / "blended_images" / "00000004\u00b2.jpg"  # "4" + "²"
    write_image(stray, truth[0].frames[0].image)
    csv, report = build(tmp_path, "blendedmvs", tmp_path / "raw")
    assert not report["skipped"] and len(scene_records(csv, NAMES[0])) == 5
    (warning,) = report["warnings"]
    assert str(stray) in warning and "not a numbered view image" in warning
