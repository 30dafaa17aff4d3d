"""Image and depth files: reading (with clear errors naming the file) and writing.

Resizing views lives in :mod:`distill3r.data.view`.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_SUBFOLDERS = ("rgb", "images")
MAX_IMAGE_PIXELS = 100_000_000  # default ceiling of read_image (a 1 MB PNG can claim 400 MP)


def natural_key(path: Path) -> list:
    """Sort key of a file name with its digit runs compared as numbers (``2.png < 10.png``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def scene_images(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The views of a scene folder, in view order, and the other files skipped.

    The one listing rule of the project (``kind: images`` sources and inference): the image
    files directly in ``folder``, else those of its first ``rgb/`` or ``images/`` subfolder
    that holds any; hidden files ignored; natural file-name order (``frame_2`` before
    ``frame_10``), so view 0, the global frame, is the same everywhere."""
    folder = Path(folder)
    images, others = [], []
    for p in sorted(folder.iterdir(), key=natural_key):
        if p.name.startswith("."):
            continue
        if is_image_file(p):
            images.append(p)
        elif p.is_file():
            others.append(p)
    if images:
        return images, others
    for sub in IMAGE_SUBFOLDERS:
        if (folder / sub).is_dir():
            found, skipped = scene_images(folder / sub)
            if found:
                return found, skipped
    return [], others


def image_pixels(path: Path) -> int:
    """Width x height from the file's header alone (Pillow reads no pixel data in ``open``);
    ``ValueError`` naming the file when the header is not an image's."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:  # Pillow's own refusal, above ~179 MP
        found = re.search(r"\((\d+) pixels\)", str(exc))
        return int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable image (corrupt or unsupported header: "
                         f"{type(exc).__name__})") from exc
    return int(width) * int(height)


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image as RGB uint8 ``[H,W,3]``; ``ValueError`` naming the file if unreadable or
    if its header claims more than ``max_pixels`` pixels (checked before decoding)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: image file not found")
    pixels = image_pixels(path)
    if pixels > max_pixels:
        raise ValueError(f"{path}: not a readable image here: its header claims {pixels} pixels, "
                         f"above the limit of {max_pixels}")
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
