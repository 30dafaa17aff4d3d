"""Image/depth IO and the resize rule (cover + centre crop, never stretch)."""

import cv2
import numpy as np
import pytest

from distill3r.data import io, view
from distill3r.geometry import depth_to_camera_points, project


def test_corrupt_and_missing_image_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        io.read_image(bad)
    with pytest.raises(ValueError, match="missing.png.*not found"):
        io.read_image(tmp_path / "missing.png")


def test_depth_png_round_trip(tmp_path):
    depth = np.random.default_rng(0).uniform(0.5, 6.0, size=(10, 12)).astype(np.float32)
    depth[0, 0] = 0
    io.write_depth_png(tmp_path / "d.png", depth)
    back = io.read_depth(tmp_path / "d.png")
    assert back[0, 0] == 0
    assert np.max(np.abs(back - depth)) <= 0.5e-4 + 1e-6


@pytest.mark.parametrize("src,dst", [((60, 80), (28, 42)), ((80, 60), (42, 28)), ((50, 50), (56, 42))])
def test_resize_crop_keeps_geometry(src, dst):
    """A 3-D point seen at pixel p before the resize is seen at the mapped pixel after it."""
    h, w = src
    K = np.array([[70.0, 0, (w - 1) / 2 + 1.3], [0, 70.0, (h - 1) / 2 - 0.7], [0, 0, 1]])
    depth = np.full((h, w), 2.0)
    img = np.zeros((h, w, 3), np.uint8)
    out, K2, d2 = view.resize_crop(img, dst, K, depth)
    assert out.shape[:2] == dst and d2.shape == dst
    # pixel centres of the output back-projected with K2 must project into the input with K
    pts = depth_to_camera_points(d2, K2)
    u, v, _ = project(pts, K)
    # the crop box: the centred box of the target's aspect, in whole source pixels
    s = max(dst[0] / h, dst[1] / w)
    bw, bh = min(w, round(dst[1] / s)), min(h, round(dst[0] / s))
    x0, y0 = (w - bw) // 2, (h - bh) // 2
    uu, vv = np.meshgrid(np.arange(dst[1]), np.arange(dst[0]))
    assert np.allclose(u, x0 + (uu + 0.5) * bw / dst[1] - 0.5, atol=1e-6)
    assert np.allclose(v, y0 + (vv + 0.5) * bh / dst[0] - 0.5, atol=1e-6)
    tf = view.ViewTransform.cover((h, w), dst)
    assert np.allclose(np.stack(tf.to_source(uu, vv)), np.stack([u, v]), atol=1e-6)
    assert np.allclose(np.stack(tf.to_output(u, v)), np.stack([uu, vv]), atol=1e-6)
    assert np.isclose(K2[0, 0] / K2[1, 1], K[0, 0] / K[1, 1], rtol=0.05)  # no stretch


def test_fit_size_keeps_orientation():
    assert view.fit_size(480, 640, 112, 14) == (84, 112)
    assert view.fit_size(640, 480, 112, 14) == (112, 84)
    with pytest.raises(ValueError):
        view.fit_size(0, 10, 112, 14)


@pytest.mark.parametrize("factor", [2, 3])
def test_resized_depth_stays_on_the_surface(factor):
    """Downsampled depth of a tilted plane lies on the same plane when back-projected with K'."""
    H, W = 42 * factor, 56 * factor
    K = np.array([[1.1 * W, 0, W / 2], [0, 1.1 * W, H / 2 - 1], [0, 0, 1]])
    n, d0 = np.array([0.2, -0.3, 1.0]), 3.0  # plane n.x = d0
    uu, vv = np.meshgrid(np.arange(W), np.arange(H))
    rays = np.stack([(uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1], np.ones_like(uu, float)], -1)
    depth = d0 / (rays @ n)
    depth[: H // 3, : W // 3] = 0  # an invalid corner must stay invalid, not be smeared
    _, K2, d2 = view.resize_crop(np.zeros((H, W, 3), np.uint8), (42, 56), K, depth)
    pts = depth_to_camera_points(d2, K2)
    ok = d2 > 0
    assert ok.mean() > 0.8
    residual = np.abs(pts[ok] @ n - d0) / d0
    assert np.median(residual) < 1e-5 and residual.max() < 1e-3


def _png_claiming(path, width: int, height: int, dtype=np.uint8) -> None:
    """A PNG whose header claims ``width x height`` (OpenCV refuses > 2^30 pixels)."""
    import struct
    import zlib

    ok, buf = cv2.imencode(".png", np.zeros((2, 2), dtype))
    data = bytearray(buf.tobytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_opencv_refusals_become_errors_naming_the_file(tmp_path):
    huge = tmp_path / "huge.png"
    _png_claiming(huge, 100_000, 100_000)
    with pytest.raises(cv2.error):  # the case really reaches OpenCV's own error
        cv2.imread(str(huge), cv2.IMREAD_UNCHANGED)
    with pytest.raises(ValueError, match="huge.png: not a readable image.*10000000000 pixels"):
        io.read_image(huge)
    with pytest.raises(ValueError, match="huge.png: not a single-channel depth image"):
        io.read_depth(huge)
    with pytest.raises(ValueError, match=r"huge.png: not a single-channel 16-bit depth PNG "
                                         r"\(scene s\)"):
        io.read_depth_png(huge, 1e-3, "scene s")
