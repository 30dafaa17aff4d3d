"""Point-cloud files and preview images.

- PLY: binary little-endian, one ``vertex`` element with ``float x, y, z``, (optionally)
  ``uchar red, green, blue`` and any extra scalar properties (inference adds ``float
  confidence`` and ``int view``: the point's local confidence and source view); readable by
  MeshLab, CloudCompare, Open3D (which skip properties they do not know). ``read_ply`` and
  ``read_ply_vertices`` are plain parsers for these files (and ASCII ones).
- Preview: a software render of the point cloud from a virtual camera behind and above view 0
  (numpy z-buffer splats), above one row per view: input image, depth, confidence.
Points are in view 0's camera frame (OpenCV: x right, y down, z forward).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from distill3r.atomic import replacing
from distill3r.data.io import write_image
from distill3r.geometry import invert_pose, look_at, project, transform_points

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2",
              "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
              "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8",
              "float64": "f8"}


def _ply_header(count: int, colors: bool, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    header = ["ply", "format binary_little_endian 1.0", "comment written by distill3r",
              f"element vertex {count}", "property float x", "property float y",
              "property float z"]
    if colors:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"property {kind} {name}" for name, kind in extra]
    header.append("end_header")
    return ("\n".join(header) + "\n").encode("ascii")


class PlyStream:
    """Appends vertices to an open binary PLY whose header announced ``count`` of them
    (and the ``extra`` scalar properties ``(name, ply type)``, e.g. ``("view", "int")``)."""

    def __init__(self, fh, path: Path, count: int, colors: bool,
                 extra: Sequence[tuple[str, str]] = ()) -> None:
        self._fh, self.path, self.count, self.colors, self.written = fh, path, count, colors, 0
        fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
        if colors:
            fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
        self.extra = [name for name, _ in extra]
        fields += [(name, "<" + _PLY_TYPES[kind]) for name, kind in extra]
        self._dtype = np.dtype(fields)

    def write(self, points: np.ndarray, colors: np.ndarray | None = None,
              **extra: np.ndarray) -> None:
        """Append ``points [M,3]`` (stored float32), ``colors [M,3]`` uint8 (required
        when the file has colours) and one ``[M]`` array per extra property (by name)."""
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"{self.path}: points must be [M,3], got {points.shape}")
        if self.colors:
            colors = np.asarray(colors) if colors is not None else None
            if colors is None or colors.shape != points.shape:
                raise ValueError(f"{self.path}: colors {None if colors is None else colors.shape}"
                                 f" do not match points {points.shape}")
            if colors.dtype != np.uint8:
                raise ValueError(f"{self.path}: colors must be uint8, got {colors.dtype}")
        if sorted(extra) != sorted(self.extra):
            raise ValueError(f"{self.path}: extra properties {sorted(extra)} given, the file "
                             f"has {sorted(self.extra)}")
        for name, values in extra.items():
            if np.shape(values) != (len(points),):
                raise ValueError(f"{self.path}: {name} has shape {np.shape(values)}, "
                                 f"expected ({len(points)},)")
        if self.written + len(points) > self.count:
            raise ValueError(f"{self.path}: more than the {self.count} vertices announced")
        data = np.empty(len(points), dtype=self._dtype)
        for name, values in extra.items():
            data[name] = values
        for axis, name in enumerate("xyz"):
            data[name] = points[:, axis]
        if self.colors:
            for axis, name in enumerate(("red", "green", "blue")):
                data[name] = colors[:, axis]
        self._fh.write(data.tobytes())
        self.written += len(points)


@contextlib.contextmanager
def ply_writer(path: str | Path, count: int, colors: bool = True,
               extra: Sequence[tuple[str, str]] = ()) -> Iterator[PlyStream]:
    """Write a binary PLY of ``count`` vertices incrementally: yields a :class:`PlyStream`;
    the file is written under a temporary name and renamed to ``path`` only when the block
    ends without an error and exactly ``count`` vertices were written (an interrupted or
    killed writer never leaves a partial file under ``path``)."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        if any(kind not in _PLY_TYPES for _, kind in extra):
            raise ValueError(f"{path}: unknown PLY property type in {list(extra)}")
        fh.write(_ply_header(count, colors, extra))
        stream = PlyStream(fh, path, count, colors, extra)
        yield stream
        if stream.written != count:
            raise ValueError(f"{path}: {stream.written} vertices written, {count} announced")


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Write ``points [M,3]`` (stored float32) and optional ``colors [M,3]`` uint8 as a
    binary little-endian PLY (written to a temporary name, then renamed)."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{path}: points must be [M,3], got {points.shape}")
    with ply_writer(path, len(points), colors is not None) as ply:
        ply.write(points, colors)


def _parse_ply_header(fh, path: Path) -> tuple[str, int, list[tuple[str, str]]]:
    if fh.readline().strip() != b"ply":
        raise ValueError(f"{path}: not a PLY file")
    fmt, count, props, in_vertex = None, None, [], False
    while True:
        line = fh.readline()
        if not line:
            raise ValueError(f"{path}: PLY header has no end_header")
        parts = line.decode("ascii", errors="replace").split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "end_header":
            break
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                count = int(parts[2])
            elif count is None and int(parts[2]) > 0:
                raise ValueError(f"{path}: PLY element {parts[1]} comes before the vertices")
        elif parts[0] == "property" and in_vertex:
            if parts[1] == "list" or parts[1] not in _PLY_TYPES:
                raise ValueError(f"{path}: unsupported vertex property {' '.join(parts[1:])}")
            props.append((parts[2], _PLY_TYPES[parts[1]]))
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii") or count is None:
        raise ValueError(f"{path}: unsupported PLY (format {fmt}, vertex count {count})")
    return fmt, count, props


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the vertices of a PLY: ``(points [M,3] float32, colors [M,3] uint8 or None)``."""
    data = read_ply_vertices(path)
    points = np.stack([data["x"], data["y"], data["z"]], axis=1).astype(np.float32)
    colors = None
    if {"red", "green", "blue"} <= set(data):
        colors = np.stack([data["red"], data["green"], data["blue"]], axis=1).astype(np.uint8)
    return points, colors


def read_ply_vertices(path: str | Path) -> dict[str, np.ndarray]:
    """Every vertex property of a PLY by name (``x``, ``y``, ``z``, ``red``, ..., extras),
    each ``[M]`` in the file's type; ``ValueError`` naming the file for a bad one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: PLY file not found")
    with open(path, "rb") as fh:
        fmt, count, props = _parse_ply_header(fh, path)
        names = [n for n, _ in props]
        if not {"x", "y", "z"} <= set(names):
            raise ValueError(f"{path}: PLY vertices lack x, y, z")
        if fmt == "ascii":
            rows = np.loadtxt(fh, max_rows=count, ndmin=2)
            data = {n: rows[:, i] for i, n in enumerate(names)}
        else:
            endian = "<" if fmt == "binary_little_endian" else ">"
            dtype = np.dtype([(n, endian + t) for n, t in props])
            raw = fh.read(dtype.itemsize * count)
            if len(raw) < dtype.itemsize * count:
                raise ValueError(f"{path}: PLY truncated ({len(raw)} bytes for {count} vertices)")
            data = np.frombuffer(raw, dtype=dtype)
    return {n: data[n].astype(t) for n, t in props}


def preview_camera(points: np.ndarray, back: float = 0.6, up: float = 0.35) -> np.ndarray:
    """A virtual camera behind and above view 0 looking at the cloud's median point, offsets
    in units of the median distance of the points from view 0. Returns c2w ``[4,4]``."""
    points = np.asarray(points, np.float64)
    if len(points) == 0:
        return np.eye(4)
    target = np.median(points, axis=0)
    scale = max(float(np.median(np.linalg.norm(points, axis=1))), 1e-6)
    return look_at(np.array([0.0, -up * scale, -back * scale]), target)


def render_points(points: np.ndarray, colors: np.ndarray, K: np.ndarray, c2w: np.ndarray,
                  size: tuple[int, int], radius: int = 1,
                  background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Z-buffered square splats of ``points [M,3]`` with ``colors [M,3]`` uint8 seen by a
    camera ``K``/``c2w`` into an image ``size=(H, W)`` -> ``[H,W,3]`` uint8."""
    H, W = size
    image = np.empty((H, W, 3), np.uint8)
    image[:] = background
    cam = transform_points(invert_pose(c2w), np.asarray(points, np.float64))
    u, v, z = project(cam, K)
    keep = np.isfinite(u) & np.isfinite(v) & (z > 1e-6)
    u, v, z, col = np.round(u[keep]).astype(np.int64), np.round(v[keep]).astype(np.int64), \
        z[keep], np.asarray(colors)[keep]
    offsets = [(dx, dy) for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1)]
    uu = np.concatenate([u + dx for dx, _ in offsets])
    vv = np.concatenate([v + dy for _, dy in offsets])
    zz = np.tile(z, len(offsets))
    cc = np.tile(col, (len(offsets), 1))
    inside = (uu >= 0) & (uu < W) & (vv >= 0) & (vv < H)
    pix, zz, cc = vv[inside] * W + uu[inside], zz[inside], cc[inside]
    order = np.lexsort((zz, pix))  # by pixel, nearest first
    first = np.unique(pix[order], return_index=True)[1]
    nearest = order[first]
    image.reshape(-1, 3)[pix[nearest]] = cc[nearest]
    return image


def colorize(values: np.ndarray, valid: np.ndarray | None = None, cmap: str = "turbo",
             lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map ``values [H,W]`` to RGB uint8 with a matplotlib colormap; range from the 2nd/98th
    percentiles of valid values unless given; invalid pixels are black."""
    import matplotlib  # lazy: only previews need it

    values = np.asarray(values, np.float64)
    ok = np.isfinite(values) if valid is None else (valid & np.isfinite(values))
    if ok.any():
        lo = float(np.percentile(values[ok], 2)) if lo is None else lo
        hi = float(np.percentile(values[ok], 98)) if hi is None else hi
    lo, hi = (0.0 if lo is None else lo), (1.0 if hi is None else hi)
    norm = np.clip((np.where(ok, values, lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = (matplotlib.colormaps[cmap](norm)[..., :3] * 255).astype(np.uint8)
    rgb[~ok] = 0
    return rgb


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                cv2.LINE_AA)
    return tile


def preview_image(images: np.ndarray, depth: np.ndarray, conf: np.ndarray, points: np.ndarray,
                  colors: np.ndarray, K: np.ndarray, max_views: int = 6,
                  tile_width: int = 160, max_render_points: int = 100_000,
                  view_ids: list[int] | None = None) -> np.ndarray:
    """One RGB uint8 image: the cloud render on top, then per view image | depth | confidence.

    Args:
        images: ``[N,H,W,3]`` uint8 inputs; depth: ``[N,H,W]`` (local z); conf: ``[N,H,W]``.
        points, colors: the exported cloud ``[M,3]`` (view 0 frame) and its ``[M,3]`` uint8.
        K: ``[3,3]`` intrinsics of the inputs (the render widens it a little).
        max_views: at most this many views (evenly spaced) get a row.
        max_render_points: the render uses every k-th point beyond this many.
        view_ids: when given, ``images``, ``depth`` and ``conf`` hold only these views (their
            indices in the scene); each gets a row (``max_views`` is ignored) and the
            confidence colour range comes from them.
    """
    N, H, W = depth.shape
    th = max(1, int(round(tile_width * H / W)))
    width = 3 * tile_width
    rh = int(round(width * H / W))
    Kr = np.asarray(K, np.float64).copy()
    Kr[:2] *= width / W
    Kr[0, 0] *= 0.75
    Kr[1, 1] *= 0.75
    if len(points) > max_render_points:  # a preview does not need every point
        step = int(np.ceil(len(points) / max_render_points))
        points, colors = points[::step], colors[::step]
    radius = 1 if len(points) > 20000 else 2
    render = render_points(points, colors, Kr, preview_camera(points), (rh, width), radius)
    rows = [_label(render, "point cloud")]
    log_conf = np.log(np.maximum(np.asarray(conf, np.float64), 1e-6))
    c_ok = np.isfinite(log_conf)
    c_lo = float(np.percentile(log_conf[c_ok], 2)) if c_ok.any() else 0.0
    c_hi = float(np.percentile(log_conf[c_ok], 98)) if c_ok.any() else 1.0
    rows_of = (preview_views(N, max_views) if view_ids is None else range(N))
    for i in rows_of:
        d_ok = np.isfinite(depth[i]) & (depth[i] > 0)
        tiles = [images[i], colorize(depth[i], d_ok, "turbo"),
                 colorize(log_conf[i], c_ok[i], "magma", c_lo, c_hi)]
        tiles = [cv2.resize(np.ascontiguousarray(t), (tile_width, th),
                            interpolation=cv2.INTER_AREA) for t in tiles]
        label = i if view_ids is None else view_ids[i]
        for t, name in zip(tiles, (f"view {label}", "depth", "confidence")):
            _label(t, name)
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def preview_views(views: int, max_views: int) -> list[int]:
    """The (at most ``max_views``, evenly spaced) views a preview shows."""
    return [int(i) for i in np.unique(np.linspace(0, views - 1, min(views, max_views))
                                      .round().astype(int))]


def write_preview(path: str | Path, *args, **kwargs) -> None:
    """:func:`preview_image` written as a PNG to ``path``."""
    write_image(path, preview_image(*args, **kwargs))
