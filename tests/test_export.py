"""PLY files and preview images."""

import numpy as np
import pytest

from distill3r.data.io import read_image
from distill3r.export import (ply_writer, preview_image, read_ply, read_ply_vertices,
                              render_points, write_ply, write_preview)
from distill3r.geometry import invert_pose, look_at


def _cloud(m=257, seed=0):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(m, 3)).astype(np.float32)
    colors = rng.integers(0, 256, size=(m, 3), dtype=np.uint8)
    return points, colors


def test_ply_round_trip_header_count_and_colours(tmp_path):
    points, colors = _cloud()
    path = tmp_path / "sub" / "cloud.ply"
    write_ply(path, points, colors)
    raw = path.read_bytes()
    header = raw[:raw.index(b"end_header\n") + len(b"end_header\n")].decode("ascii").split("\n")
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    assert "element vertex 257" in header
    props = [line for line in header if line.startswith("property")]
    assert props == ["property float x", "property float y", "property float z",
                     "property uchar red", "property uchar green", "property uchar blue"]
    assert len(raw) == len("\n".join(header)) + 257 * 15  # 3 floats + 3 bytes per vertex
    p2, c2 = read_ply(path)
    assert np.array_equal(p2, points) and np.array_equal(c2, colors)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_ply_without_colours_and_empty(tmp_path):
    points, _ = _cloud(5)
    write_ply(tmp_path / "a.ply", points)
    p2, c2 = read_ply(tmp_path / "a.ply")
    assert np.array_equal(p2, points) and c2 is None
    write_ply(tmp_path / "e.ply", np.zeros((0, 3)), np.zeros((0, 3), np.uint8))
    p3, c3 = read_ply(tmp_path / "e.ply")
    assert p3.shape == (0, 3) and c3.shape == (0, 3)


def test_ply_extra_properties_round_trip_and_are_checked(tmp_path):
    points, colors = _cloud(6)
    conf = np.linspace(1, 2, 6, dtype=np.float32)
    view = np.array([0, 0, 1, 1, 2, 2], np.int32)
    path = tmp_path / "x.ply"
    with ply_writer(path, 6, extra=(("confidence", "float"), ("view", "int"))) as ply:
        ply.write(points[:2], colors[:2], confidence=conf[:2], view=view[:2])
        with pytest.raises(ValueError, match="extra properties"):
            ply.write(points[2:], colors[2:], confidence=conf[2:])
        ply.write(points[2:], colors[2:], confidence=conf[2:], view=view[2:])
    data = read_ply_vertices(path)
    assert list(data) == ["x", "y", "z", "red", "green", "blue", "confidence", "view"]
    assert np.array_equal(data["confidence"], conf) and np.array_equal(data["view"], view)
    p2, c2 = read_ply(path)  # readers that know only xyz and colours still read it
    assert np.array_equal(p2, points) and np.array_equal(c2, colors)


def test_read_ascii_ply(tmp_path):
    path = tmp_path / "a.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\n"
                    "property float z\nproperty uchar red\nproperty uchar green\n"
                    "property uchar blue\nelement face 0\nproperty list uchar int vertex_indices\n"
                    "end_header\n1 2 3 255 0 10\n4 5 6 0 128 0\n")
    p, c = read_ply(path)
    assert p.tolist() == [[1, 2, 3], [4, 5, 6]] and c.tolist() == [[255, 0, 10], [0, 128, 0]]


def test_bad_ply_input_raises(tmp_path):
    points, colors = _cloud(4)
    with pytest.raises(ValueError, match=r"\[M,3\]"):
        write_ply(tmp_path / "x.ply", points[:, :2])
    with pytest.raises(ValueError, match="uint8"):
        write_ply(tmp_path / "x.ply", points, colors.astype(np.float32))
    write_ply(tmp_path / "t.ply", points, colors)
    (tmp_path / "t.ply").write_bytes((tmp_path / "t.ply").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_ply(tmp_path / "t.ply")
    (tmp_path / "n.ply").write_text("hello\n")
    with pytest.raises(ValueError, match="not a PLY"):
        read_ply(tmp_path / "n.ply")


def test_render_keeps_the_nearest_point_per_pixel():
    K = np.array([[10.0, 0, 4], [0, 10.0, 4], [0, 0, 1]])
    points = np.array([[0, 0, 5.0], [0, 0, 2.0], [0, 0, 9.0]])  # all on the centre pixel
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    img = render_points(points, colors, K, np.eye(4), (9, 9), radius=0)
    assert img[4, 4].tolist() == [0, 255, 0]
    assert (img.reshape(-1, 3) == 255).all(1).sum() == 80  # the rest is background
    behind = render_points(-points, colors, K, np.eye(4), (9, 9), radius=0)
    assert (behind == 255).all()


def test_look_at_is_a_rotation_pointing_at_the_target():
    c2w = look_at(np.array([0.0, -1.0, -2.0]), np.array([0.5, 0.0, 3.0]))
    R = c2w[:3, :3]
    assert np.allclose(R.T @ R, np.eye(3)) and np.linalg.det(R) == pytest.approx(1.0)
    target_cam = invert_pose(c2w)[:3] @ np.array([0.5, 0.0, 3.0, 1.0])
    assert np.allclose(target_cam[:2], 0) and target_cam[2] > 0


def test_preview_image_layout(tmp_path):
    rng = np.random.default_rng(0)
    N, H, W = 8, 12, 16
    images = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    depth = rng.uniform(1, 3, (N, H, W))
    conf = rng.uniform(1, 50, (N, H, W))
    points, colors = _cloud(500)
    points[:, 2] = np.abs(points[:, 2]) + 2
    K = np.array([[16.0, 0, 7.5], [0, 16.0, 5.5], [0, 0, 1]])
    img = preview_image(images, depth, conf, points, colors, K, max_views=3, tile_width=64)
    assert img.dtype == np.uint8 and img.shape == (3 * 48 + 3 * 48, 192, 3)
    assert (img[:144] != 255).any()  # the cloud is visible in the render
    write_preview(tmp_path / "p.png", images, depth, conf, points, colors, K)
    assert read_image(tmp_path / "p.png").shape[1] == 3 * 160
