"""The co3d source on rendered truth written in the CO3Dv2 layout: gzip JSON frame
annotations, float16-bit depth PNGs with scale_adjustment and depth masks, PyTorch3D poses and
NDC intrinsics."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from dataset_fixtures import (TOLERANCE, TruthFrame, TruthScene, build, check_images,
                              geometry_error, render_truth, scene_records, write_jpeg)

from distill3r.data.sources.co3d import camera_from_viewpoint

FLIP = np.array([-1.0, -1.0, 1.0])
SCALE_ADJ = 1.3  # the PNGs store depth / 1.3
MASKED = (slice(10, 13), slice(20, 23))  # pixels the depth masks mark invalid
NAN_PIXEL = (1, 2)  # a pixel whose stored depth is NaN
SEQS = ("106_12648_23157", "34_1479_4753")


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> list[TruthScene]:
    return render_truth(tmp_path_factory.mktemp("truth") / "demo", num_scenes=2, views=4)


# ---------------------------------------------------------------- writers (the CO3D layout)

def viewpoint(frame: TruthFrame, fmt: str, pose: str = "pytorch3d") -> dict:
    """CO3D viewpoint of a truth frame. ``pose``: "pytorch3d" (right), or the mistakes
    "opencv" (OpenCV w2c written as R/T) and "noflip" (transposed but no x/y axis flip)."""
    R_cv, t_cv = frame.w2c[:3, :3], frame.w2c[:3, 3]
    R, T = {"pytorch3d": (R_cv.T * FLIP[None, :], t_cv * FLIP),
            "opencv": (R_cv, t_cv),
            "noflip": (R_cv.T, t_cv)}[pose]
    h, w = frame.depth.shape
    half = np.array([w / 2.0, h / 2.0])
    s = np.full(2, min(h, w) / 2.0) if fmt == "ndc_isotropic" else half
    K = frame.K
    focal = np.array([K[0, 0], K[1, 1]]) / s
    principal = (half - (K[:2, 2] + 0.5)) / s
    return {"R": R.tolist(), "T": T.tolist(), "focal_length": focal.tolist(),
            "principal_point": principal.tolist(), "intrinsics_format": fmt}


def write_depth(path: Path, depth: np.ndarray) -> None:
    stored = (depth / SCALE_ADJ).astype(np.float16)
    stored[NAN_PIXEL] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), stored.view(np.uint16))


def write_sequence(root: Path, category: str, seq: str, scene: TruthScene, fmt: str,
                   pose: str) -> list[dict]:
    """Image, depth, depth-mask and mask files of one sequence; its frame annotations."""
    entries = []
    for f in scene.frames:
        n = f.index
        rel = f"{category}/{seq}"
        image = f"{rel}/images/frame{n + 1:06d}.jpg"
        depth = f"{rel}/depths/frame{n + 1:06d}.jpg.geometric.png"
        dmask = f"{rel}/depth_masks/frame{n + 1:06d}.png"
        mask = f"{rel}/masks/frame{n + 1:06d}.png"
        write_jpeg(root / image, f.image)
        write_depth(root / depth, f.depth)
        valid = np.full(f.depth.shape, 255, np.uint8)
        valid[MASKED] = 0
        (root / dmask).parent.mkdir(parents=True, exist_ok=True)
        (root / mask).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / dmask), valid)
        assert cv2.imwrite(str(root / mask), np.full(f.depth.shape, 200, np.uint8))
        h, w = f.depth.shape
        entries.append({
            "sequence_name": seq, "frame_number": n, "frame_timestamp": n / 30.0,
            "image": {"path": image, "size": [h, w]},
            "depth": {"path": depth, "scale_adjustment": SCALE_ADJ, "mask_path": dmask},
            "mask": {"path": mask, "mass": float(h * w)},
            "viewpoint": viewpoint(f, fmt, pose), "meta": {"frame_type": "unseen"}})
    return entries


def write_jgz(path: Path, obj) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(obj, f)


def write_category(root: Path, category: str, seqs: dict[str, TruthScene],
                   fmt: str = "ndc_isotropic", pose: str = "pytorch3d",
                   annotations: bool = True) -> list[dict]:
    """A category folder; the frame annotation list is shuffled (not in frame order)."""
    entries = [e for seq, scene in seqs.items()
               for e in write_sequence(root, category, seq, scene, fmt, pose)]
    random.Random(3).shuffle(entries)
    assert [e["frame_number"] for e in entries] != sorted(e["frame_number"] for e in entries)
    if annotations:
        write_jgz(root / category / "frame_annotations.jgz", entries)
    write_jgz(root / category / "sequence_annotations.jgz",
              [{"sequence_name": s, "category": category, "video": None, "point_cloud": None,
                "viewpoint_quality_score": 1.0} for s in seqs])
    (root / category / "set_lists").mkdir(exist_ok=True)
    (root / category / "set_lists" / "set_lists_manyview_dev_0.json").write_text(json.dumps(
        {"train": [[e["sequence_name"], e["frame_number"], e["image"]["path"]]
                   for e in entries], "val": [], "test": []}))
    return entries


def corrupt_deflate(path: Path) -> None:
    """Flip the first deflate block's type bits of a gzip file to the reserved value 3."""
    data = bytearray(path.read_bytes())
    start = data.index(0, 10) + 1 if data[3] & 0x08 else 10  # FNAME: NUL-terminated name
    data[start] |= 0x06
    path.write_bytes(bytes(data))


def png_claiming_size(path: Path, width: int, height: int) -> None:
    """A 1x1 grey PNG whose header (with a valid CRC) claims ``width`` x ``height``."""
    ok, encoded = cv2.imencode(".png", np.zeros((1, 1), np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def stored_depth(record) -> np.ndarray:
    return np.load(record.depth, allow_pickle=False)


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("fmt", ["ndc_isotropic", "ndc_norm_image_bounds"])
def test_co3d_frames_depth_and_geometry(truth, tmp_path, fmt):
    root = tmp_path / "co3d"
    write_category(root, "hydrant", dict(zip(SEQS, truth)), fmt)
    csv, report = build(tmp_path, "co3d", root)
    assert report["scenes"] == 2 and not report["skipped"], report["skipped"]
    for seq, scene in zip(SEQS, truth):
        records = scene_records(csv, f"hydrant_{seq}")
        assert [r.frame for r in records] == [f.index for f in scene.frames]  # frame_number
        check_images(records, scene.frames, lossy=True)
        assert geometry_error(records, scene.frames) < TOLERANCE
        depth, true = stored_depth(records[1]), scene.frames[1].depth
        assert np.all(depth[MASKED] == 0) and depth[NAN_PIXEL] == 0
        keep = np.ones_like(depth, bool)
        keep[MASKED] = keep[NAN_PIXEL] = False
        np.testing.assert_allclose(depth[keep], true[keep], rtol=1e-3)  # float16 x 1.3


@pytest.mark.parametrize("pose", ["opencv", "noflip"])
def test_pose_convention_mistakes_fail_the_geometry_check(truth, tmp_path, pose):
    root = tmp_path / "co3d"
    write_category(root, "hydrant", {SEQS[0]: truth[0]}, pose=pose)
    csv, _ = build(tmp_path, "co3d", root)
    records = scene_records(csv, f"hydrant_{SEQS[0]}")
    assert geometry_error(records, truth[0].frames) > 10 * TOLERANCE


@pytest.mark.parametrize("fmt", ["ndc_isotropic", "ndc_norm_image_bounds"])
def test_camera_projects_like_pytorch3d(fmt):
    """Independent of the fixture writer: PyTorch3D's projection (X_cam = X @ R + T, NDC =
    f * xy / z + p, screen = half - NDC * s, pixel i's centre at i + 0.5) against K and c2w."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R = q * np.sign(np.linalg.det(q))
    T = rng.normal(size=3)
    focal, principal = np.array([2.1, 1.9]), np.array([0.1, -0.2])
    h, w = 48, 64
    cam = np.column_stack([rng.uniform(-1, 1, 20), rng.uniform(-1, 1, 20),
                           rng.uniform(2, 4, 20)])
    world = (cam - T) @ R.T  # so that world @ R + T == cam
    half = np.array([w / 2.0, h / 2.0])
    s = np.full(2, min(h, w) / 2.0) if fmt == "ndc_isotropic" else half
    ndc = focal * cam[:, :2] / cam[:, 2:] + principal
    expected = half - ndc * s - 0.5  # to pixel centres at integers
    K, c2w = camera_from_viewpoint(R, T, focal, principal, fmt, (h, w))
    w2c = np.linalg.inv(c2w)
    cv = world @ w2c[:3, :3].T + w2c[:3, 3]
    np.testing.assert_allclose(cv[:, 2], cam[:, 2], atol=1e-9)  # same depth (z forward)
    uv = cv @ K.T
    np.testing.assert_allclose(uv[:, :2] / uv[:, 2:], expected, atol=1e-9)


def test_bad_input_skips_only_that_scene(truth, tmp_path):
    root = tmp_path / "co3d"
    good, malformed, no_image, small_depth, fisheye = (
        "106_12648_23157", "110_13051_23361", "117_13765_29509", "150_16615_34189",
        "167_18184_34441")
    huge_focal, huge_scale, small_image, huge_mask = (
        "185_19982_37678", "194_20878_39742", "216_22790_47496", "247_26469_51778")
    entries = write_category(root, "hydrant", {good: truth[0], malformed: truth[1],
                                               no_image: truth[0], small_depth: truth[1],
                                               fisheye: truth[0], huge_focal: truth[1],
                                               huge_scale: truth[0], small_image: truth[1],
                                               huge_mask: truth[0]})
    for e in entries:
        if e["sequence_name"] == malformed and e["frame_number"] == 2:
            e["viewpoint"]["R"] = [[1.0, 0.0], [0.0, 1.0]]
        if e["sequence_name"] == fisheye:
            e["viewpoint"]["intrinsics_format"] = "fisheye"
        if e["sequence_name"] == huge_focal and e["frame_number"] == 1:
            e["viewpoint"]["focal_length"][0] = 10 ** 400  # a JSON integer beyond float64
        if e["sequence_name"] == huge_scale and e["frame_number"] == 3:
            e["depth"]["scale_adjustment"] = 10 ** 400
    write_jgz(root / "hydrant" / "frame_annotations.jgz", entries)
    missing = root / "hydrant" / no_image / "images" / "frame000003.jpg"
    missing.unlink()
    wrong = root / "hydrant" / small_depth / "depths" / "frame000002.jpg.geometric.png"
    write_depth(wrong, truth[1].frames[1].depth[::2, ::2])
    resized = root / "hydrant" / small_image / "images" / "frame000002.jpg"
    write_jpeg(resized, truth[1].frames[1].image[::2, ::2])
    mask = root / "hydrant" / huge_mask / "depth_masks" / "frame000001.png"
    png_claiming_size(mask, 40000, 40000)
    with pytest.raises(cv2.error):  # what OpenCV does with it (rather than returning None)
        cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)
    write_category(root, "teddybear", {"34_1479_4753": truth[1]}, annotations=False)

    csv, report = build(tmp_path, "co3d", root)
    assert report["scenes"] == 1
    assert {r.scene for r in scene_records(csv, f"hydrant_{good}")} == {f"hydrant_{good}"}
    reasons = {s["scene"]: s["reason"] for s in report["skipped"]}
    annots = root / "hydrant" / "frame_annotations.jgz"
    expect = {f"hydrant_{malformed}": [str(annots), "malformed", "viewpoint.R"],
              f"hydrant_{no_image}": [str(missing), "image file not found"],
              f"hydrant_{small_depth}": [str(wrong), "32x24"],
              f"hydrant_{fisheye}": [str(annots), "unsupported intrinsics_format 'fisheye'"],
              f"hydrant_{huge_focal}": [str(annots), "malformed", "focal_length"],
              f"hydrant_{huge_scale}": [str(annots), "malformed", "depth.scale_adjustment"],
              f"hydrant_{small_image}": [str(resized), "image is 32x24", "camera is 64x48"],
              f"hydrant_{huge_mask}": [str(mask), "not a depth mask"],
              "teddybear_34_1479_4753": [str(root / "teddybear" / "frame_annotations.jgz"),
                                         "not found"]}
    assert set(reasons) == set(expect)
    for scene, parts in expect.items():
        for part in [*parts, scene]:
            assert part in reasons[scene], (scene, part, reasons[scene])


def test_options_select_categories_and_ignore_depth_masks(truth, tmp_path):
    root = tmp_path / "co3d"
    write_category(root, "hydrant", {SEQS[0]: truth[0]})
    write_category(root, "teddybear", {SEQS[1]: truth[1]}, fmt="ndc_norm_image_bounds")
    (root / "teddybear" / "eval_batches").mkdir()  # not a sequence
    csv, report = build(tmp_path, "co3d", root,
                        {"categories": ["teddybear"], "use_depth_masks": False})
    assert report["scenes"] == 1 and not report["skipped"]
    records = scene_records(csv, f"teddybear_{SEQS[1]}")
    depth = stored_depth(records[0])
    np.testing.assert_allclose(depth[MASKED], truth[1].frames[0].depth[MASKED], rtol=1e-3)
    assert depth[NAN_PIXEL] == 0


def test_corrupt_annotation_file_skips_its_sequences(truth, tmp_path):
    root = tmp_path / "co3d"
    write_category(root, "hydrant", {SEQS[0]: truth[0]})
    write_category(root, "teddybear", {SEQS[1]: truth[1]})
    shutil.copyfile(root / "hydrant" / "sequence_annotations.jgz",
                    root / "teddybear" / "frame_annotations.jgz")  # valid gzip JSON, wrong
    bad = root / "hydrant" / "frame_annotations.jgz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="no usable scene"):
        build(tmp_path, "co3d", root)
    report = json.loads((tmp_path / "manifest" / "report.json").read_text())
    reasons = {s["scene"]: s["reason"] for s in report["skipped"]}
    assert str(bad) in reasons[f"hydrant_{SEQS[0]}"]
    assert "gzip" in reasons[f"hydrant_{SEQS[0]}"]
    assert f"no frame annotations for sequence '{SEQS[1]}'" in reasons[f"teddybear_{SEQS[1]}"]


@pytest.mark.parametrize("damage, error", [("deflate", zlib.error), ("truncated", EOFError),
                                           ("nested", RecursionError)])
def test_unreadable_annotation_data_skips_the_category(truth, tmp_path, damage, error):
    root = tmp_path / "co3d"
    write_category(root, "hydrant", {SEQS[0]: truth[0]})
    write_category(root, "teddybear", {SEQS[1]: truth[1]})
    bad = root / "hydrant" / "frame_annotations.jgz"
    if damage == "deflate":
        corrupt_deflate(bad)
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-40])
    else:
        bad.write_bytes(gzip.compress(b"[" * 200_000 + b"]" * 200_000))
    with pytest.raises(error):  # what the gzip and json modules raise on these files
        with gzip.open(bad, "rt", encoding="utf-8") as f:
            json.load(f)
    csv, report = build(tmp_path, "co3d", root)
    assert report["scenes"] == 1 and scene_records(csv, f"teddybear_{SEQS[1]}")
    (skipped,) = report["skipped"]
    assert skipped["scene"] == f"hydrant_{SEQS[0]}"
    assert str(bad) in skipped["reason"] and "not a readable gzip JSON file" in skipped["reason"]
    assert f"scene hydrant_{SEQS[0]}" in skipped["reason"]
