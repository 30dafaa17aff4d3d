"""COLMAP sparse models: text and binary round trips, pose and intrinsics conventions, errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from distill3r.data import colmap_model as cm


def random_model(seed: int = 3) -> cm.Model:
    rng = np.random.default_rng(seed)
    model = cm.Model()
    for i, spec in enumerate(cm.CAMERA_MODELS):
        cam_id = 10 + 3 * i
        model.cameras[cam_id] = cm.Camera(cam_id, spec.name, int(rng.integers(10, 4000)),
                                          int(rng.integers(10, 3000)),
                                          rng.normal(size=spec.num_params) * 100)
    cam_ids = list(model.cameras)
    for image_id in (7, 2, 40, 5):
        n = int(rng.integers(0, 6)) if image_id != 40 else 0  # one image with no observation
        q = rng.normal(size=4)
        model.images[image_id] = cm.Image(
            image_id, q / np.linalg.norm(q), rng.normal(size=3) * 5,
            cam_ids[image_id % len(cam_ids)], f"sub/img_{image_id:04d}.jpg",
            point3d_ids=rng.integers(-1, 1000, size=n).astype(np.int64),
            xys=rng.uniform(0, 500, size=(n, 2)))
    for point_id in (3, 999, 12):
        k = int(rng.integers(1, 4))
        model.points3d[point_id] = cm.Point3D(
            point_id, rng.normal(size=3), rng.integers(0, 256, size=3).astype(np.uint8),
            float(rng.uniform(0, 2)), image_ids=rng.integers(1, 50, size=k).astype(np.int64),
            point2d_idxs=rng.integers(0, 20, size=k).astype(np.int64))
    return model


def assert_models_equal(a: cm.Model, b: cm.Model) -> None:
    assert list(a.cameras) == list(b.cameras)
    for k, ca in a.cameras.items():
        cb = b.cameras[k]
        assert (ca.id, ca.model, ca.width, ca.height) == (cb.id, cb.model, cb.width, cb.height)
        np.testing.assert_array_equal(ca.params, cb.params)
    assert list(a.images) == list(b.images)
    for k, ia in a.images.items():
        ib = b.images[k]
        assert (ia.id, ia.camera_id, ia.name) == (ib.id, ib.camera_id, ib.name)
        for x, y in ((ia.qvec, ib.qvec), (ia.tvec, ib.tvec), (ia.point3d_ids, ib.point3d_ids),
                     (ia.xys, ib.xys)):
            np.testing.assert_array_equal(x, y)
    assert list(a.points3d) == list(b.points3d)
    for k, pa in a.points3d.items():
        pb = b.points3d[k]
        assert pa.id == pb.id and pa.error == pb.error
        for x, y in ((pa.xyz, pb.xyz), (pa.rgb, pb.rgb), (pa.image_ids, pb.image_ids),
                     (pa.point2d_idxs, pb.point2d_idxs)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("binary", [False, True])
def test_round_trip(tmp_path, binary):
    model = random_model()
    cm.write_model(model, tmp_path, binary=binary)
    back = cm.read_model(tmp_path)
    assert_models_equal(model, back)
    suffix = ".bin" if binary else ".txt"
    assert {k: p.name for k, p in back.paths.items()} == {k: k + suffix for k in cm.FILES}


def test_text_and_binary_read_the_same(tmp_path):
    model = random_model(seed=8)
    cm.write_model(model, tmp_path / "txt", binary=False)
    cm.write_model(model, tmp_path / "bin", binary=True)
    assert_models_equal(cm.read_model(tmp_path / "txt"), cm.read_model(tmp_path / "bin"))
    # both present: .bin wins
    cm.write_model(random_model(seed=9), tmp_path / "bin", binary=False)
    assert_models_equal(cm.read_model(tmp_path / "bin"), model)


def test_text_reader_accepts_colmap_style_text(tmp_path):
    (tmp_path / "cameras.txt").write_text(
        "# Camera list\n1 PINHOLE 64 48 50 51 32 24\n\n2 SIMPLE_RADIAL 64 48 50 32 24 0\n")
    (tmp_path / "images.txt").write_text(
        "# Image list\n#   IMAGE_ID ...\n"
        "1 1 0 0 0 0 0 0 1 a.jpg\n"
        "\n"  # an image without observations: its points line is empty
        "2 1 0 0 0 1 2 3 2 b.jpg\n"
        "10.5 20.5 -1 11.0 12.0 7\n")
    model = cm.read_model(tmp_path)
    assert model.points3d == {} and "points3D" not in model.paths
    assert [im.name for im in model.images.values()] == ["a.jpg", "b.jpg"]
    assert model.images[1].point3d_ids.size == 0
    np.testing.assert_array_equal(model.images[2].point3d_ids, [-1, 7])
    np.testing.assert_array_equal(model.images[2].xys, [[10.5, 20.5], [11.0, 12.0]])


def test_pose_convention_on_a_known_rotation():
    # world-to-camera: 90 degrees about z, then translation t
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    image = cm.Image(1, np.array([c, 0.0, 0.0, s]), np.array([1.0, 2.0, 3.0]), 1, "a.jpg")
    R = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(cm.qvec_to_rotmat(image.qvec), R, atol=1e-12)
    c2w = cm.image_c2w(image)
    np.testing.assert_allclose(c2w[:3, :3], R.T, atol=1e-12)
    np.testing.assert_allclose(c2w[:3, 3], -R.T @ [1.0, 2.0, 3.0], atol=1e-12)
    # a world point maps to the camera by qvec/tvec and back by c2w
    X = np.array([0.3, -2.0, 5.0])
    x_cam = R @ X + [1.0, 2.0, 3.0]
    np.testing.assert_allclose(c2w[:3, :3] @ x_cam + c2w[:3, 3], X, atol=1e-12)
    q, t = cm.pose_from_c2w(c2w)
    np.testing.assert_allclose(q, image.qvec, atol=1e-12)
    np.testing.assert_allclose(t, image.tvec, atol=1e-12)


def test_quaternion_round_trip_on_random_rotations():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.normal(size=4)
        q = q / np.linalg.norm(q) * np.sign(q[0])
        np.testing.assert_allclose(cm.rotmat_to_qvec(cm.qvec_to_rotmat(q)), q, atol=1e-12)
    for R in (np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1])):
        np.testing.assert_allclose(cm.qvec_to_rotmat(cm.rotmat_to_qvec(R)), R, atol=1e-12)


def test_camera_K_convention_and_models():
    K = cm.camera_K(cm.Camera(1, "PINHOLE", 64, 48, np.array([50.0, 51.0, 32.0, 24.0])))
    np.testing.assert_array_equal(K, [[50, 0, 31.5], [0, 51, 23.5], [0, 0, 1]])
    K = cm.camera_K(cm.Camera(1, "SIMPLE_PINHOLE", 64, 48, np.array([50.0, 32.0, 24.0])))
    np.testing.assert_array_equal(K, [[50, 0, 31.5], [0, 50, 23.5], [0, 0, 1]])
    # zero distortion is a pinhole camera
    K = cm.camera_K(cm.Camera(1, "SIMPLE_RADIAL", 64, 48, np.array([50.0, 32.0, 24.0, 0.0])))
    assert K[0, 0] == K[1, 1] == 50 and K[0, 2] == 31.5
    K = cm.camera_K(cm.Camera(1, "OPENCV", 64, 48, np.array([50.0, 52, 32, 24, 0, 0, 0, 0])))
    assert K[1, 1] == 52 and K[1, 2] == 23.5
    with pytest.raises(ValueError, match="distorted camera model OPENCV"):
        cm.camera_K(cm.Camera(1, "OPENCV", 64, 48, np.array([50.0, 52, 32, 24, 0.1, 0, 0, 0])))
    with pytest.raises(ValueError, match="OPENCV_FISHEYE"):  # fisheye: never a pinhole
        cm.camera_K(cm.Camera(1, "OPENCV_FISHEYE", 64, 48, np.array([50.0, 52, 32, 24, 0, 0, 0,
                                                                     0])))


def test_covisibility_counts_shared_points():
    ims = [cm.Image(i, np.array([1.0, 0, 0, 0]), np.zeros(3), 1, f"{i}.jpg",
                    point3d_ids=np.array(ids, np.int64))
           for i, ids in enumerate([[1, 2, 3, -1, -1], [2, 3, 4], [9], []])]
    a = cm.covisibility(ims)
    np.testing.assert_array_equal(a, [[3, 2, 0, 0], [2, 3, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_malformed_files_are_named(tmp_path):
    cm.write_model(random_model(), tmp_path / "m", binary=False)
    cams = tmp_path / "m" / "cameras.txt"
    cams.write_text("1 PINHOLE 64 48 50 51 32\n")  # one parameter short
    with pytest.raises(ValueError, match=rf"{cams}: malformed COLMAP cameras file: line 1"):
        cm.read_model(tmp_path / "m")
    cams.write_text("1 PINHOLE 64 48 50 51 32 x\n")
    with pytest.raises(ValueError, match=str(cams)):
        cm.read_model(tmp_path / "m")
    cams.unlink()
    with pytest.raises(ValueError, match=rf"{cams}: COLMAP cameras file not found"):
        cm.read_model(tmp_path / "m")

    cm.write_model(random_model(), tmp_path / "b", binary=True)
    images = tmp_path / "b" / "images.bin"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(ValueError, match=rf"{images}: malformed COLMAP images file: .*truncated"):
        cm.read_model(tmp_path / "b")
    cams = tmp_path / "b" / "cameras.bin"
    cams.write_bytes(struct.pack("<QiiQQ", 1, 1, 99, 64, 48))
    with pytest.raises(ValueError, match=rf"{cams}: .*unknown camera model id 99"):
        cm.read_model(tmp_path / "b")
    points = tmp_path / "b" / "points3D.bin"
    points.write_bytes(points.read_bytes() + b"\0")
    cm.write_model(random_model(), tmp_path / "c", binary=True)
    (tmp_path / "c" / "points3D.bin").write_bytes(points.read_bytes())
    with pytest.raises(ValueError, match="trailing bytes"):
        cm.read_model(tmp_path / "c")


# ---------------------------------------------------------------- every parser error is named

CAMERAS = "# comment\n1 PINHOLE 64 48 50 51 32 24\n"
IMAGES = "1 1 0 0 0 0 0 0 1 a.jpg\n1.5 2.5 7 3.5 4.5 -1\n2 1 0 0 0 1 2 3 1 b.jpg\n\n"
POINTS = "7 0.1 0.2 0.3 10 20 30 0.5 1 0\n"
BIG = str(2 ** 63)


def text_model(folder, **files) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    contents = {"cameras": CAMERAS, "images": IMAGES, "points3D": POINTS, **files}
    for kind, text in contents.items():
        data = text if isinstance(text, bytes) else text.encode()
        (folder / f"{kind}.txt").write_bytes(data)


def binary_camera(cam_id=1, model_id=1, width=64, height=48, params=(50.0, 51, 32, 24)) -> bytes:
    return struct.pack("<QIiQQ", 1, cam_id, model_id, width, height) + struct.pack(
        f"<{len(params)}d", *params)


def binary_image(qvec=(1.0, 0, 0, 0), name=b"a.jpg") -> bytes:
    return (struct.pack("<QI7dI", 1, 1, *qvec, 0, 0, 0, 1) + name + b"\0"
            + struct.pack("<Q", 0))


def binary_point(point_id=7, track=((1, 0),)) -> bytes:
    out = struct.pack("<QQ3d3Bd", 1, point_id, 0.1, 0.2, 0.3, 10, 20, 30, 0.5)
    return out + struct.pack("<Q", len(track)) + b"".join(struct.pack("<II", *t) for t in track)


def test_valid_tiny_models_read(tmp_path):
    text_model(tmp_path / "t")
    model = cm.read_model(tmp_path / "t")
    np.testing.assert_array_equal(model.images[1].point3d_ids, [7, -1])
    np.testing.assert_array_equal(model.points3d[7].image_ids, [1])
    (tmp_path / "b").mkdir()
    for kind, data in (("cameras", binary_camera()), ("images", binary_image()),
                       ("points3D", binary_point())):
        (tmp_path / "b" / f"{kind}.bin").write_bytes(data)
    model = cm.read_model(tmp_path / "b")
    assert model.images[1].name == "a.jpg" and model.points3d[7].rgb.tolist() == [10, 20, 30]


TEXT_CASES = {  # kind, contents, where, message
    "track id beyond int64": ("points3D", f"7 0 0 0 1 2 3 0.5 {BIG} 0\n", "line 1",
                              "too large"),
    "point id beyond int64": ("points3D", f"{BIG} 0 0 0 1 2 3 0.5 1 0\n", "line 1",
                              "point3D id"),
    "colour": ("points3D", "\n7 0 0 0 1 2 300 0.5\n", "line 2", "colour 300"),
    "observation id beyond int64": ("images", IMAGES.replace(" 7 ", f" {BIG} "), "line 2",
                                    "too large"),
    "fractional observation id": ("images", IMAGES.replace(" 7 ", " 7.5 "), "line 2",
                                  "7.5"),
    "bad observation x": ("images", IMAGES.replace("1.5", "x"), "line 2", "x"),
    "nan quaternion": ("images", IMAGES.replace("2 1 0 0 0", "2 nan 0 0 0"), "line 3",
                       "non-finite quaternion"),
    "zero quaternion": ("images", IMAGES.replace("2 1 0 0 0", "2 0 0 0 0"), "line 3",
                        "zero quaternion"),
    "negative image id": ("images", IMAGES.replace("2 1 0 0 0", "-2 1 0 0 0"), "line 3",
                          "image id -2"),
    "image id beyond uint32": ("images", IMAGES.replace("2 1 0 0 0", f"{2 ** 32} 1 0 0 0"),
                               "line 3", "image id"),
    "duplicate image": ("images", IMAGES.replace("2 1 0 0 0", "1 1 0 0 0"), "line 3",
                        "duplicate image id 1"),
    "bad utf-8": ("images", IMAGES.encode().replace(b"b.jpg", b"b\xff.jpg"), "utf-8",
                  "can't decode"),
    "parameter": ("cameras", CAMERAS.replace("32 24", "32 x"), "line 2", "'x'"),
    "infinite parameter": ("cameras", CAMERAS.replace("32 24", "32 1e999"), "line 2",
                           "non-finite"),
    "zero width": ("cameras", CAMERAS.replace("64 48", "0 48"), "line 2", "width 0"),
    "camera id beyond int64": ("cameras", CAMERAS.replace("1 PINHOLE", f"{BIG} PINHOLE"),
                               "line 2", "camera id"),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_parser_errors_are_value_errors_naming_file_and_line(tmp_path, case):
    kind, contents, where, message = TEXT_CASES[case]
    text_model(tmp_path, **{kind: contents})
    with pytest.raises(Exception) as info:
        cm.read_model(tmp_path)
    assert type(info.value) is ValueError, repr(info.value)  # not OverflowError etc.
    text = str(info.value)
    assert text.startswith(f"{tmp_path / (kind + '.txt')}: malformed COLMAP {kind} file: {where}")
    assert message in text, text


BINARY_CASES = {  # kind, contents, where, message
    "point id beyond int64": ("points3D", binary_point(point_id=2 ** 63), "byte 8",
                              "point3D id"),
    "truncated track": ("points3D", binary_point()[:-3], "byte 8", "truncated"),
    "zero quaternion": ("images", binary_image(qvec=(0.0, 0, 0, 0)), "byte 8",
                        "zero quaternion"),
    "bad utf-8 name": ("images", binary_image(name=b"\xffa.jpg"), "byte 8", "can't decode"),
    "empty name": ("images", binary_image(name=b""), "byte 8", "empty name"),
    "nan parameter": ("cameras", binary_camera(params=(50.0, float("nan"), 32, 24)), "byte 8",
                      "non-finite"),
    "zero height": ("cameras", binary_camera(height=0), "byte 8", "height 0"),
    "no count": ("cameras", b"\1\0", "byte 0", "truncated"),
    "trailing bytes": ("cameras", binary_camera() + b"\0", "byte 64", "1 trailing bytes"),
}


@pytest.mark.parametrize("case", sorted(BINARY_CASES))
def test_binary_parser_errors_are_value_errors_naming_file_and_byte(tmp_path, case):
    kind, contents, where, message = BINARY_CASES[case]
    files = {"cameras": binary_camera(), "images": binary_image(), "points3D": binary_point(),
             kind: contents}
    for name, data in files.items():
        (tmp_path / f"{name}.bin").write_bytes(data)
    with pytest.raises(Exception) as info:
        cm.read_model(tmp_path)
    assert type(info.value) is ValueError, repr(info.value)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / (kind + '.bin')}: malformed COLMAP {kind} file: {where}")
    assert message in text, text


def test_points_false_does_not_read_the_points_file(tmp_path):
    text_model(tmp_path, points3D=f"7 0 0 0 1 2 3 0.5 {BIG} 0\n")  # malformed
    with pytest.raises(ValueError, match="points3D.txt"):
        cm.read_model(tmp_path)
    model = cm.read_model(tmp_path, points=False)
    assert model.points3d == {} and set(model.paths) == {"cameras", "images"}
    np.testing.assert_array_equal(model.images[1].point3d_ids, [7, -1])  # covisibility input


def test_uint32_ids_round_trip_in_binary(tmp_path):
    big = 2 ** 32 - 1  # COLMAP's camera_t and image_t are uint32
    model = cm.Model(cameras={big: cm.Camera(big, "PINHOLE", 64, 48,
                                             np.array([50.0, 51, 32, 24]))},
                     images={big: cm.Image(big, np.array([1.0, 0, 0, 0]), np.zeros(3), big,
                                           "a.jpg")},
                     points3d={5: cm.Point3D(5, np.zeros(3), np.zeros(3, np.uint8), 0.1,
                                             np.array([big]), np.array([big]))})
    cm.write_model(model, tmp_path, binary=True)
    assert_models_equal(model, cm.read_model(tmp_path))
