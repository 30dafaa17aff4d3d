"""The view layer: how one source image becomes a model-resolution view, and back.

A :class:`ViewTransform` is an axis-aligned crop box of the source (whole source pixels) resized
to the output size. Every place that changes a view's resolution uses it: the manifest (images
pre-resized to ``data.resize_max``), the cache (views at ``cache.image_size``), the Fast3R
adapter (teacher input and the way back to the cache grid) and inference.

Pixel convention: pixel centres at integer coordinates, so a source point ``x`` maps to
``u = (x - x0 + 0.5) * sx - 0.5`` with ``sx = W / (x1 - x0)`` (likewise in ``y``), and ``K``
follows the same affine map. The project's resize rule (:meth:`ViewTransform.cover`): scale
uniformly so the output covers the target, then centre-crop; never stretch (the box's aspect
equals the target's up to the rounding of the box to whole source pixels, under one pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class ViewTransform:
    """Source ``(h, w)`` -> output ``(H, W)``: crop ``box = (x0, y0, x1, y1)`` (source pixels,
    end-exclusive), then resize the crop to ``(H, W)``."""

    src_hw: tuple[int, int]
    box: tuple[int, int, int, int]
    out_hw: tuple[int, int]

    def __post_init__(self) -> None:
        h, w = self.src_hw
        x0, y0, x1, y1 = self.box
        H, W = self.out_hw
        if min(h, w, H, W) <= 0 or not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"invalid view transform: source {h}x{w}, box {self.box}, "
                             f"output {H}x{W}")

    @classmethod
    def cover(cls, src_hw: tuple[int, int], out_hw: tuple[int, int]) -> "ViewTransform":
        """The project's resize rule: the largest centred box of the output's aspect."""
        (h, w), (H, W) = src_hw, out_hw
        if min(h, w, H, W) <= 0:
            raise ValueError(f"invalid image size {h}x{w} -> {H}x{W}")
        s = max(H / h, W / w)
        bw = min(w, max(1, int(round(W / s))))
        bh = min(h, max(1, int(round(H / s))))
        x0, y0 = (w - bw) // 2, (h - bh) // 2
        return cls((h, w), (x0, y0, x0 + bw, y0 + bh), (H, W))

    @property
    def scale(self) -> tuple[float, float]:
        """``(sx, sy)``: output pixels per source pixel along x and y."""
        x0, y0, x1, y1 = self.box
        return self.out_hw[1] / (x1 - x0), self.out_hw[0] / (y1 - y0)

    def to_output(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source pixel coordinates -> output pixel coordinates."""
        sx, sy = self.scale
        return (x - self.box[0] + 0.5) * sx - 0.5, (y - self.box[1] + 0.5) * sy - 0.5

    def to_source(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Output pixel coordinates -> source pixel coordinates."""
        sx, sy = self.scale
        return self.box[0] + (u + 0.5) / sx - 0.5, self.box[1] + (v + 0.5) / sy - 0.5

    def intrinsics(self, K: np.ndarray) -> np.ndarray:
        """``K [3,3]`` of the source -> ``K`` of the output."""
        sx, sy = self.scale
        out = np.asarray(K, np.float64).copy()
        out[0, 0] *= sx
        out[0, 1] *= sx
        out[1, 1] *= sy
        out[0, 2] = (out[0, 2] - self.box[0] + 0.5) * sx - 0.5
        out[1, 2] = (out[1, 2] - self.box[1] + 0.5) * sy - 0.5
        return out

    def source_intrinsics(self, K: np.ndarray) -> np.ndarray:
        """``K [3,3]`` of the output -> ``K`` of the source (the inverse of
        :meth:`intrinsics`)."""
        sx, sy = self.scale
        out = np.asarray(K, np.float64).copy()
        out[0, 0] /= sx
        out[0, 1] /= sx
        out[1, 1] /= sy
        out[0, 2] = (out[0, 2] + 0.5) / sx - 0.5 + self.box[0]
        out[1, 2] = (out[1, 2] + 0.5) / sy - 0.5 + self.box[1]
        return out

    def _crop(self, array: np.ndarray) -> np.ndarray:
        h, w = self.src_hw
        if array.shape[:2] != (h, w):
            raise ValueError(f"array of size {array.shape[0]}x{array.shape[1]} given to a view "
                             f"transform of a {h}x{w} source")
        x0, y0, x1, y1 = self.box
        return array[y0:y1, x0:x1]

    def image(self, image: np.ndarray, upsample: int = cv2.INTER_LINEAR) -> np.ndarray:
        """``[h,w(,C)]`` -> ``[H,W(,C)]`` (area averaging when shrinking, ``upsample`` else)."""
        crop = self._crop(image)
        H, W = self.out_hw
        shrink = H * W < crop.shape[0] * crop.shape[1]
        out = cv2.resize(np.ascontiguousarray(crop), (W, H),
                         interpolation=cv2.INTER_AREA if shrink else upsample)
        return np.ascontiguousarray(out)

    def depth(self, depth: np.ndarray, max_jump: float = 0.05) -> np.ndarray:
        """Depth ``[h,w]`` (0 = invalid) -> ``[H,W]`` float32 without inventing surfaces.

        Inverse depth is affine in pixel coordinates on a plane, so bilinear interpolation of
        ``1/depth`` is exact on planar patches; where the neighbourhood holds invalid pixels or
        a depth jump larger than ``max_jump`` (relative), the nearest sample is kept instead, so
        no points float between foreground and background."""
        crop = np.asarray(self._crop(np.asarray(depth, np.float32)), np.float32)
        size_wh = (self.out_hw[1], self.out_hw[0])
        valid = crop > 0
        inv = np.where(valid, 1.0 / np.where(valid, crop, 1.0), 0.0).astype(np.float32)
        inv_lin = cv2.resize(inv, size_wh, interpolation=cv2.INTER_LINEAR)
        cover = cv2.resize(valid.astype(np.float32), size_wh, interpolation=cv2.INTER_LINEAR)
        nearest = cv2.resize(np.ascontiguousarray(crop), size_wh,
                             interpolation=cv2.INTER_NEAREST_EXACT)
        smooth = (cover > 0.999) & (inv_lin > 0)
        lin = np.where(smooth, 1.0 / np.where(smooth, inv_lin, 1.0), 0.0)
        ok = smooth & (np.abs(lin - nearest) <= max_jump * np.maximum(nearest, 1e-9))
        return np.ascontiguousarray(np.where(ok, lin, nearest).astype(np.float32))

    def pixel_map_to(self, other: "ViewTransform", transpose: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[H,W]`` maps: for every output pixel of ``self``, its pixel coordinates in
        the output of ``other`` (a transform of the same source; of the transposed source when
        ``transpose``), ready for ``cv2.remap``."""
        H, W = self.out_hw
        v, u = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64),
                           indexing="ij")
        x, y = self.to_source(u, v)
        if transpose:
            x, y = y, x
        mx, my = other.to_output(x, y)
        return mx.astype(np.float32), my.astype(np.float32)


@dataclass(frozen=True)
class ViewChain:
    """Transforms applied one after the other (source first): how a source image of
    ``src_hw`` became an output of ``out_hw``, and the way back for pixels and ``K``."""

    steps: tuple[ViewTransform, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a view chain needs at least one transform")
        for a, b in zip(self.steps, self.steps[1:]):
            if a.out_hw != b.src_hw:
                raise ValueError(f"view chain: output {a.out_hw} does not feed source {b.src_hw}")

    @property
    def src_hw(self) -> tuple[int, int]:
        return self.steps[0].src_hw

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.steps[-1].out_hw

    def image(self, image: np.ndarray) -> np.ndarray:
        for step in self.steps:
            image = step.image(image)
        return image

    def to_source(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Output pixel coordinates -> source pixel coordinates."""
        for step in reversed(self.steps):
            u, v = step.to_source(u, v)
        return u, v

    def source_intrinsics(self, K: np.ndarray) -> np.ndarray:
        """``K`` of the output -> ``K`` of the source image."""
        for step in reversed(self.steps):
            K = step.source_intrinsics(K)
        return K


def fit_size(height: int, width: int, long_side: int, multiple: int) -> tuple[int, int]:
    """Target ``(H, W)`` with the long side ``long_side`` and the input's aspect, both rounded
    to multiples of ``multiple`` (at least one patch). Portrait stays portrait."""
    if height <= 0 or width <= 0:
        raise ValueError(f"invalid image size {height}x{width}")
    scale = long_side / max(height, width)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def resize_crop(image: np.ndarray, size: tuple[int, int], K: np.ndarray | None = None,
                depth: np.ndarray | None = None):
    """Apply the project's resize rule (:meth:`ViewTransform.cover`) to an image and,
    optionally, its intrinsics and depth.

    Args:
        image: ``[h,w,C]`` uint8; size: target ``(H, W)``.
        K: ``[3,3]`` intrinsics of ``image``, or None.
        depth: ``[h,w]`` depth, 0 = invalid (see :meth:`ViewTransform.depth`), or None.
    Returns:
        ``(image [H,W,C], K' or None, depth' or None)``.
    """
    tf = ViewTransform.cover(image.shape[:2], tuple(size))
    return (tf.image(image), None if K is None else tf.intrinsics(K),
            None if depth is None else tf.depth(depth))


def shrink_transform(hw: tuple[int, int], min_side: int) -> ViewTransform | None:
    """The early downscale of very large images (to twice what any crop needs, to bound
    memory), or None when the image is small enough."""
    h, w = hw
    if min(h, w) <= 2 * min_side:
        return None
    s = 2 * min_side / min(h, w)
    return ViewTransform((h, w), (0, 0, w, h), (max(1, round(h * s)), max(1, round(w * s))))


def view_chain(hw: tuple[int, int], min_side: int, out_hw: tuple[int, int]) -> ViewChain:
    """How a source image of size ``hw`` becomes a model input of ``out_hw``: the early
    downscale (:func:`shrink_transform`, if any), then the project's resize rule
    (:meth:`ViewTransform.cover`)."""
    shrink = shrink_transform(hw, min_side)
    steps = (shrink,) if shrink is not None else ()
    return ViewChain(steps + (ViewTransform.cover(shrink.out_hw if shrink else hw, out_hw),))
