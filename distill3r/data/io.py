"""Image and depth files, and the one resize rule of the project.

Resize rule: never stretch. ``resize_crop`` scales an image uniformly so that it
covers the target size, then centre-crops; intrinsics and depth follow exactly the same
transform. Target sizes are multiples of the patch size (``fit_size``).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB uint8 ``[H,W,3]``; ``ValueError`` naming the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: image file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error:  # e.g. a header claiming more pixels than OpenCV allows
        img = None
    if img is None:
        raise ValueError(f"{path}: not a readable image (corrupt or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write an RGB uint8 image (format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)):
        raise ValueError(f"{path}: could not write image")


DEPTH_PNG_SCALE = 1e-4  # metres per unit of a 16-bit depth PNG (0.1 mm)


def _imread_unchanged(path: str | Path) -> np.ndarray | None:
    """``cv2.imread`` as stored (e.g. uint16), None if unreadable (OpenCV's own errors too)."""
    try:
        return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None


def read_depth(path: str | Path, scale: float = DEPTH_PNG_SCALE) -> np.ndarray:
    """Metric depth ``[H,W]`` float32, 0 where invalid.

    ``.png``: 16-bit, metres = value * ``scale``; ``.npy``: float metres (non-finite -> 0).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: depth file not found")
    if path.suffix == ".npy":
        try:
            depth = np.load(path, allow_pickle=False).astype(np.float32)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: not a readable depth array: {exc}") from exc
        depth[~np.isfinite(depth)] = 0
    else:
        raw = _imread_unchanged(path)
        if raw is None or raw.ndim != 2:
            raise ValueError(f"{path}: not a single-channel depth image")
        depth = raw.astype(np.float32) * np.float32(scale)
    if depth.ndim != 2:
        raise ValueError(f"{path}: depth must be 2-D, got shape {depth.shape}")
    depth[depth < 0] = 0
    return depth


def read_depth_png(path: str | Path, scale: float, where: str = "") -> np.ndarray:
    """A single-channel 16-bit depth PNG as float32 ``value * scale`` (0 = invalid);
    ``ValueError`` naming the file (and ``where``, e.g. the scene) otherwise."""
    raw = _imread_unchanged(path)
    if raw is None or raw.ndim != 2 or raw.dtype != np.uint16:
        raise ValueError(f"{path}: not a single-channel 16-bit depth PNG"
                         + (f" ({where})" if where else ""))
    return raw.astype(np.float32) * np.float32(scale)


def valid_depth(depth: np.ndarray) -> np.ndarray:
    """``depth`` as float32 with non-finite and non-positive values set to 0 (invalid)."""
    depth = np.asarray(depth, np.float32)
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(0)).astype(np.float32)


def write_depth_png(path: str | Path, depth: np.ndarray, scale: float = DEPTH_PNG_SCALE) -> None:
    """Write metric depth as a 16-bit PNG (0 = invalid; values beyond 6.5 m at 0.1 mm -> 0)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    units = np.round(np.asarray(depth, np.float64) / scale)
    units[~np.isfinite(units) | (units > 65535) | (units < 0)] = 0
    if not cv2.imwrite(str(path), units.astype(np.uint16)):
        raise ValueError(f"{path}: could not write depth")


def fit_size(height: int, width: int, long_side: int, multiple: int) -> tuple[int, int]:
    """Target ``(H, W)`` with the long side ``long_side`` and the input's aspect, both rounded
    to multiples of ``multiple`` (at least one patch). Portrait stays portrait."""
    if height <= 0 or width <= 0:
        raise ValueError(f"invalid image size {height}x{width}")
    scale = long_side / max(height, width)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def _resize_depth(depth: np.ndarray, size_wh: tuple[int, int], max_jump: float = 0.05) -> np.ndarray:
    """Resample depth at the output pixel centres without inventing surfaces.

    Inverse depth is affine in pixel coordinates on a plane, so bilinear interpolation of
    ``1/depth`` is exact on planar patches; where the neighbourhood holds invalid pixels or a
    depth jump larger than ``max_jump`` (relative), the nearest sample is kept instead, so no
    points float between foreground and background.
    """
    valid = depth > 0
    inv = np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0).astype(np.float32)
    inv_lin = cv2.resize(inv, size_wh, interpolation=cv2.INTER_LINEAR)
    cover = cv2.resize(valid.astype(np.float32), size_wh, interpolation=cv2.INTER_LINEAR)
    nearest = cv2.resize(depth, size_wh, interpolation=cv2.INTER_NEAREST_EXACT)
    smooth = (cover > 0.999) & (inv_lin > 0)
    lin = np.where(smooth, 1.0 / np.where(smooth, inv_lin, 1.0), 0.0)
    ok = smooth & (np.abs(lin - nearest) <= max_jump * np.maximum(nearest, 1e-9))
    return np.where(ok, lin, nearest).astype(np.float32)


def resize_crop(image: np.ndarray, size: tuple[int, int], K: np.ndarray | None = None,
                depth: np.ndarray | None = None):
    """Scale uniformly to cover ``size=(H, W)`` then centre-crop; never stretches.

    Args:
        image: ``[h,w,C]`` uint8.
        K: ``[3,3]`` intrinsics of ``image`` (pixel centres at integer coordinates), or None.
        depth: ``[h,w]`` depth (resized with nearest neighbour so no depths are invented).
    Returns:
        ``(image [H,W,C], K' or None, depth' or None)``.
    """
    H, W = size
    h, w = image.shape[:2]
    s = max(H / h, W / w)
    nh, nw = max(H, int(round(h * s))), max(W, int(round(w * s)))
    sx, sy = nw / w, nh / h  # exact per-axis factors after rounding (differ by < 1 px)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    x0, y0 = (nw - W) // 2, (nh - H) // 2
    out = resized[y0:y0 + H, x0:x0 + W]
    K_out = None
    if K is not None:
        K_out = np.asarray(K, np.float64).copy()
        # pixel centre convention: u' = (u + 0.5) * sx - 0.5 - x0
        K_out[0, 0] *= sx
        K_out[1, 1] *= sy
        K_out[0, 2] = (K_out[0, 2] + 0.5) * sx - 0.5 - x0
        K_out[1, 2] = (K_out[1, 2] + 0.5) * sy - 0.5 - y0
    d_out = None
    if depth is not None:
        d_out = _resize_depth(np.asarray(depth, np.float32), (nw, nh))[y0:y0 + H, x0:x0 + W]
    return np.ascontiguousarray(out), K_out, (None if d_out is None else np.ascontiguousarray(d_out))
