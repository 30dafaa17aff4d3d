"""COLMAP sparse models (``cameras``, ``images``, ``points3D``): read and write, text and binary.

Files (COLMAP "Output Format"; binary is little-endian)::

    cameras.txt   CAMERA_ID MODEL WIDTH HEIGHT PARAMS...
    cameras.bin   uint64 n; per camera: uint32 id, int32 model_id, uint64 width, uint64 height,
                  float64 params[k] (k fixed by the model)
    images.txt    two lines per image: IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME
                  then X Y POINT3D_ID ... (may be empty; POINT3D_ID -1 = not triangulated)
    images.bin    uint64 n; per image: uint32 id, float64 qw qx qy qz, float64 tx ty tz,
                  uint32 camera_id, NAME bytes + NUL, uint64 m, m x (float64 x, float64 y,
                  uint64 point3D_id, 2**64-1 = not triangulated, read as int64 -1)
    points3D.txt  POINT3D_ID X Y Z R G B ERROR IMAGE_ID POINT2D_IDX ...
    points3D.bin  uint64 n; per point: uint64 id, float64 x y z, uint8 r g b, float64 error,
                  uint64 track_length, track_length x (uint32 image_id, uint32 point2D_idx)

Lines starting with ``#`` are comments. :func:`read_model` prefers ``.bin`` over ``.txt`` per
file; a missing ``points3D`` gives no points (the poses do not need them), and
``read_model(folder, points=False)`` skips that file altogether (a source that only needs
poses, or ``Image.point3d_ids`` for covisibility, neither parses nor depends on it).

Checked while reading (else ``ValueError`` naming the file and the line or byte): ids in range
(camera/image ids uint32, point3D ids in [0, 2**63)), unique ids, the parameter count of a known
camera model, positive camera sizes, finite parameters, poses and point coordinates, a non-zero
quaternion, colours 0..255; every parser exception (overflow, truncation, bad UTF-8...) becomes
such a ``ValueError``.

Conventions: an image's ``(qvec, tvec)`` is the world-to-camera transform, quaternion
``w, x, y, z``, OpenCV camera axes (x right, y down, z forward); :func:`image_c2w` inverts it.
COLMAP puts the centre of the top-left pixel at ``(0.5, 0.5)``; the project puts pixel centres
at integers, so :func:`camera_K` subtracts 0.5 from the principal point.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

from distill3r.geometry import invert_pose


@dataclass(frozen=True)
class CameraModel:
    id: int
    name: str
    num_params: int
    num_focal: int  # 1: params start f, cx, cy; 2: fx, fy, cx, cy
    perspective: bool  # zero distortion parameters make it a pinhole camera


CAMERA_MODELS: tuple[CameraModel, ...] = (
    CameraModel(0, "SIMPLE_PINHOLE", 3, 1, True),
    CameraModel(1, "PINHOLE", 4, 2, True),
    CameraModel(2, "SIMPLE_RADIAL", 4, 1, True),
    CameraModel(3, "RADIAL", 5, 1, True),
    CameraModel(4, "OPENCV", 8, 2, True),
    CameraModel(5, "OPENCV_FISHEYE", 8, 2, False),
    CameraModel(6, "FULL_OPENCV", 12, 2, True),
    CameraModel(7, "FOV", 5, 2, False),
    CameraModel(8, "SIMPLE_RADIAL_FISHEYE", 4, 1, False),
    CameraModel(9, "RADIAL_FISHEYE", 5, 1, False),
    CameraModel(10, "THIN_PRISM_FISHEYE", 12, 2, False),
    CameraModel(11, "RAD_TAN_THIN_PRISM_FISHEYE", 16, 2, False),
    CameraModel(12, "SIMPLE_DIVISION", 4, 1, True),
    CameraModel(13, "DIVISION", 5, 2, True),
    CameraModel(14, "SIMPLE_FISHEYE", 3, 1, False),
    CameraModel(15, "FISHEYE", 4, 2, False),
)
MODELS_BY_ID = {m.id: m for m in CAMERA_MODELS}
MODELS_BY_NAME = {m.name: m for m in CAMERA_MODELS}
PINHOLE_MODELS = ("SIMPLE_PINHOLE", "PINHOLE")
FILES = ("cameras", "images", "points3D")


@dataclass
class Camera:
    id: int
    model: str  # COLMAP model name, e.g. "PINHOLE"
    width: int
    height: int
    params: np.ndarray  # float64 [num_params]


@dataclass
class Image:
    id: int
    qvec: np.ndarray  # [4] w, x, y, z: world-to-camera rotation
    tvec: np.ndarray  # [3] world-to-camera translation
    camera_id: int
    name: str  # path relative to the image folder (may contain '/')
    point3d_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # -1 = none
    xys: np.ndarray | None = None  # [n,2] float64 observation pixels (COLMAP convention)


@dataclass
class Point3D:
    id: int
    xyz: np.ndarray  # [3] float64
    rgb: np.ndarray  # [3] uint8
    error: float
    image_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    point2d_idxs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class Model:
    cameras: dict[int, Camera] = field(default_factory=dict)
    images: dict[int, Image] = field(default_factory=dict)
    points3d: dict[int, Point3D] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)  # file read per FILES entry


# ------------------------------------------------------------------------------ geometry

def qvec_to_rotmat(qvec: np.ndarray) -> np.ndarray:
    """Rotation matrix of a quaternion ``w, x, y, z`` (normalised first)."""
    q = np.asarray(qvec, np.float64).reshape(4)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError(f"invalid quaternion {q.tolist()}")
    w, x, y, z = q / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """Unit quaternion ``w, x, y, z`` (``w >= 0``) of a rotation matrix."""
    R = np.asarray(R, np.float64).reshape(3, 3)
    # largest of 4w^2, 4x^2, 4y^2, 4z^2 gives the best-conditioned formula
    diag = np.array([R[0, 0] + R[1, 1] + R[2, 2], R[0, 0] - R[1, 1] - R[2, 2],
                     -R[0, 0] + R[1, 1] - R[2, 2], -R[0, 0] - R[1, 1] + R[2, 2]])
    k = int(np.argmax(diag))
    s = 2.0 * np.sqrt(max(1.0 + diag[k], 1e-300))
    if k == 0:
        q = [s / 4, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif k == 1:
        q = [(R[2, 1] - R[1, 2]) / s, s / 4, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif k == 2:
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, s / 4, (R[1, 2] + R[2, 1]) / s]
    else:
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, s / 4]
    q = np.array(q) / np.linalg.norm(q)
    return -q if q[0] < 0 else q


def image_w2c(image: Image) -> np.ndarray:
    """The image's 4x4 world-to-camera transform (OpenCV axes)."""
    T = np.eye(4)
    T[:3, :3] = qvec_to_rotmat(image.qvec)
    T[:3, 3] = np.asarray(image.tvec, np.float64).reshape(3)
    return T


def image_c2w(image: Image) -> np.ndarray:
    """The image's 4x4 OpenCV camera-to-world pose (inverse of COLMAP's world-to-camera)."""
    return invert_pose(image_w2c(image))


def pose_from_c2w(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COLMAP ``(qvec, tvec)`` (world-to-camera) of an OpenCV camera-to-world pose."""
    w2c = invert_pose(c2w)
    return rotmat_to_qvec(w2c[:3, :3]), w2c[:3, 3]


def is_pinhole(camera: Camera) -> bool:
    """True for PINHOLE / SIMPLE_PINHOLE, and for perspective models whose distortion
    parameters are all zero (e.g. SIMPLE_RADIAL with k = 0)."""
    model = MODELS_BY_NAME.get(camera.model)
    if model is None or not model.perspective or len(camera.params) != model.num_params:
        return False
    return bool(np.all(np.asarray(camera.params[model.num_focal + 2:]) == 0))


def camera_K(camera: Camera) -> np.ndarray:
    """3x3 ``K`` in pixels with pixel centres at integers (COLMAP's principal point - 0.5);
    ``ValueError`` if the camera is not a pinhole camera."""
    if not is_pinhole(camera):
        raise ValueError(f"camera {camera.id} uses the distorted camera model {camera.model} "
                         f"(params {np.asarray(camera.params).tolist()}), not a pinhole camera")
    p = np.asarray(camera.params, np.float64)
    model = MODELS_BY_NAME[camera.model]
    fx, fy = (p[0], p[0]) if model.num_focal == 1 else (p[0], p[1])
    cx, cy = p[model.num_focal], p[model.num_focal + 1]
    return np.array([[fx, 0.0, cx - 0.5], [0.0, fy, cy - 0.5], [0.0, 0.0, 1.0]])


def covisibility(images: list[Image]) -> np.ndarray:
    """``[n,n]`` number of 3D points each pair of ``images`` both observe (diagonal: the
    image's own count), from their ``point3d_ids``."""
    n = len(images)
    ids = [np.unique(np.asarray(im.point3d_ids, np.int64)) for im in images]
    ids = [i[i >= 0] for i in ids]
    if n == 0 or not any(len(i) for i in ids):
        return np.zeros((n, n))
    _, cols = np.unique(np.concatenate(ids), return_inverse=True)
    rows = np.repeat(np.arange(n), [len(i) for i in ids])
    incidence = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                                  shape=(n, int(cols.max()) + 1))
    return (incidence @ incidence.T).toarray().astype(np.float64)


# ------------------------------------------------------------------------------ reading

# every exception a parser can raise on bad input: UnicodeDecodeError is a ValueError,
# OverflowError an ArithmeticError, IndexError/KeyError LookupErrors
_PARSE_ERRORS = (ValueError, ArithmeticError, LookupError, TypeError, struct.error)
_UINT32_END = 2 ** 32  # camera and image ids are uint32 in COLMAP
_INT64_END = 2 ** 63  # point3D ids are int64 here (images store them signed, -1 = none)
_ATTRIBUTES = {"cameras": "cameras", "images": "images", "points3D": "points3d"}


def read_model(folder: str | Path, points: bool = True) -> Model:
    """Read ``cameras``, ``images`` and (if ``points``) ``points3D`` from ``folder`` (``.bin``
    preferred over ``.txt`` per file). ``ValueError`` naming the file (and the line or byte)
    if cameras or images are missing or any file read is malformed; no points3D file gives an
    empty point set. ``points=False`` does not open the points3D file at all."""
    folder = Path(folder)
    model = Model()
    for kind in FILES if points else FILES[:2]:
        path = _model_file(folder, kind)
        if path is None:
            if kind == "points3D":
                continue
            raise ValueError(f"{folder / (kind + '.txt')}: COLMAP {kind} file not found "
                             f"(nor {kind}.bin)")
        model.paths[kind] = path
        setattr(model, _ATTRIBUTES[kind], _read_file(path, kind))
    return model


def _read_file(path: Path, kind: str) -> dict:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: unreadable COLMAP {kind} file: {exc}") from exc
    at = _Location()
    try:
        return _READERS[(kind, path.suffix)](data, at)
    except _PARSE_ERRORS as exc:
        raise ValueError(f"{path}: malformed COLMAP {kind} file: {at}: {exc}") from exc


def _model_file(folder: Path, kind: str) -> Path | None:
    for suffix in (".bin", ".txt"):
        if (folder / f"{kind}{suffix}").is_file():
            return folder / f"{kind}{suffix}"
    return None


def has_model(folder: str | Path) -> bool:
    """Whether ``folder`` holds a COLMAP cameras and images file."""
    return all(_model_file(Path(folder), kind) is not None for kind in FILES[:2])


class _Location:
    """Where a reader is in its file (``line 7``, ``byte 120``), for error messages."""

    def __init__(self) -> None:
        self.text = "start of file"

    def __str__(self) -> str:
        return self.text


# ---------------------------------------------------------------- records, checked

def _int(token: str | int, what: str, low: int, end: int) -> int:
    value = int(token)
    if not low <= value < end:
        raise ValueError(f"{what} {value} outside [{low}, {end})")
    return value


def _finite(values, what: str) -> np.ndarray:
    array = np.asarray(values, np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"non-finite {what} {array.tolist()}")
    return array


def _add(table: dict, key: int, value, what: str) -> None:
    if key in table:
        raise ValueError(f"duplicate {what} id {key}")
    table[key] = value


def _camera(cam_id: int, name: str, width: int, height: int, params) -> Camera:
    spec = MODELS_BY_NAME.get(name)
    params = _finite(params, f"parameters of camera {cam_id}")
    if spec is not None and len(params) != spec.num_params:
        raise ValueError(f"camera model {name} needs {spec.num_params} parameters, got "
                         f"{len(params)}")
    _int(width, f"camera {cam_id} width", 1, _INT64_END)
    _int(height, f"camera {cam_id} height", 1, _INT64_END)
    return Camera(_int(cam_id, "camera id", 0, _UINT32_END), name, int(width), int(height),
                  params)


def _image(image_id: int, qvec, tvec, camera_id: int, name: str, xys: np.ndarray,
           point3d_ids: np.ndarray) -> Image:
    qvec = _finite(qvec, f"quaternion of image {image_id}")
    if np.linalg.norm(qvec) < 1e-12:
        raise ValueError(f"zero quaternion of image {image_id}")
    if not name:
        raise ValueError(f"image {image_id} has an empty name")
    if len(point3d_ids) and point3d_ids.min() < -1:
        raise ValueError(f"image {image_id}: point3D id {point3d_ids.min()} < -1")
    return Image(_int(image_id, "image id", 0, _UINT32_END), qvec,
                 _finite(tvec, f"translation of image {image_id}"),
                 _int(camera_id, "camera id", 0, _UINT32_END), name,
                 point3d_ids=point3d_ids, xys=xys)


def _point(point_id: int, xyz, rgb, error: float, track: np.ndarray) -> Point3D:
    if len(track) and (track.min() < 0 or track.max() >= _UINT32_END):
        raise ValueError(f"point3D {point_id}: track ids outside [0, {_UINT32_END})")
    return Point3D(_int(point_id, "point3D id", 0, _INT64_END), _finite(xyz, "point"),
                   np.array([_int(c, "colour", 0, 256) for c in rgb], np.uint8), float(error),
                   image_ids=track[:, 0].astype(np.int64),
                   point2d_idxs=track[:, 1].astype(np.int64))


# ---------------------------------------------------------------- text files

def _text_lines(data: bytes, at: _Location) -> list[str]:
    at.text = "utf-8 decoding"
    return data.decode("utf-8-sig").split("\n")


def _records(data: bytes, at: _Location):
    """Tokens of the non-empty, non-comment lines of a text model file (``at`` follows)."""
    for number, line in enumerate(_text_lines(data, at), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            at.text = f"line {number}"
            yield line.split()


def _int64s(tokens: list[str]) -> np.ndarray:
    return np.array(tokens, dtype=str).astype(np.int64)  # OverflowError beyond int64


def _read_cameras_txt(data: bytes, at: _Location) -> dict[int, Camera]:
    cameras: dict[int, Camera] = {}
    for tokens in _records(data, at):
        if len(tokens) < 4:
            raise ValueError("expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS...")
        cam = _camera(int(tokens[0]), tokens[1], int(tokens[2]), int(tokens[3]),
                      np.array(tokens[4:], np.float64))
        _add(cameras, cam.id, cam, "camera")
    return cameras


def _read_images_txt(data: bytes, at: _Location) -> dict[int, Image]:
    images: dict[int, Image] = {}
    lines = _text_lines(data, at)
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        at.text = f"line {i}"
        head = line.split(maxsplit=9)
        if len(head) < 10:
            raise ValueError("expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME")
        # the observations line follows immediately, even when empty
        obs = lines[i].split() if i < len(lines) else []
        i += 1
        at.text = f"line {i}"
        if len(obs) % 3:
            raise ValueError("observations must be X Y POINT3D_ID triples")
        xys = np.array([obs[0::3], obs[1::3]], np.float64).T.reshape(-1, 2)
        point3d_ids = _int64s(obs[2::3])
        at.text = f"line {i - 1}"
        image = _image(int(head[0]), np.array(head[1:5], np.float64),
                       np.array(head[5:8], np.float64), int(head[8]), head[9].strip(),
                       xys, point3d_ids)
        _add(images, image.id, image, "image")
    return images


def _read_points_txt(data: bytes, at: _Location) -> dict[int, Point3D]:
    points: dict[int, Point3D] = {}
    for tokens in _records(data, at):
        if len(tokens) < 8 or (len(tokens) - 8) % 2:
            raise ValueError("expected POINT3D_ID X Y Z R G B ERROR (IMAGE_ID POINT2D_IDX)...")
        point = _point(int(tokens[0]), np.array(tokens[1:4], np.float64), tokens[4:7],
                       float(tokens[7]), _int64s(tokens[8:]).reshape(-1, 2))
        _add(points, point.id, point, "point3D")
    return points


# ---------------------------------------------------------------- binary files

class _Cursor:
    """Sequential little-endian reads from a byte buffer; clear errors when it runs out.
    :meth:`record` marks where the next record starts (``at``, for error messages)."""

    def __init__(self, data: bytes, at: _Location):
        self.data = data
        self.pos = 0
        self.at = at

    def record(self) -> None:
        self.at.text = f"byte {self.pos}"

    def unpack(self, fmt: str) -> tuple:
        fmt = "<" + fmt
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ValueError(f"file truncated at byte {self.pos}")
        out = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return out

    def count(self) -> int:
        self.record()
        return self.unpack("Q")[0]

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = dtype.itemsize * count
        if count < 0 or self.pos + size > len(self.data):
            raise ValueError(f"file truncated at byte {self.pos} (needs {count} records)")
        out = np.frombuffer(self.data, dtype, count, self.pos).copy()
        self.pos += size
        return out

    def cstring(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ValueError(f"unterminated image name at byte {self.pos}")
        out = self.data[self.pos:end].decode("utf-8")
        self.pos = end + 1
        return out

    def finish(self) -> None:
        self.record()
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} trailing bytes after the last record")


_OBS = np.dtype([("xy", "<f8", (2,)), ("id", "<i8")])  # uint64 -1 (none) reads as int64 -1
_TRACK = np.dtype([("image_id", "<u4"), ("point2d_idx", "<u4")])


def _read_cameras_bin(data: bytes, at: _Location) -> dict[int, Camera]:
    cur = _Cursor(data, at)
    cameras: dict[int, Camera] = {}
    for _ in range(cur.count()):
        cur.record()
        cam_id, model_id, width, height = cur.unpack("IiQQ")
        spec = MODELS_BY_ID.get(model_id)
        if spec is None:
            raise ValueError(f"camera {cam_id}: unknown camera model id {model_id}")
        cam = _camera(cam_id, spec.name, width, height, cur.array("<f8", spec.num_params))
        _add(cameras, cam.id, cam, "camera")
    cur.finish()
    return cameras


def _read_images_bin(data: bytes, at: _Location) -> dict[int, Image]:
    cur = _Cursor(data, at)
    images: dict[int, Image] = {}
    for _ in range(cur.count()):
        cur.record()
        values = cur.unpack("I7dI")
        name = cur.cstring()
        obs = cur.array(_OBS, cur.unpack("Q")[0])
        image = _image(values[0], values[1:5], values[5:8], values[8], name,
                       obs["xy"].astype(np.float64), obs["id"].astype(np.int64))
        _add(images, image.id, image, "image")
    cur.finish()
    return images


def _read_points_bin(data: bytes, at: _Location) -> dict[int, Point3D]:
    cur = _Cursor(data, at)
    points: dict[int, Point3D] = {}
    for _ in range(cur.count()):
        cur.record()
        values = cur.unpack("Q3d3Bd")
        raw = cur.array(_TRACK, cur.unpack("Q")[0])
        track = np.stack([raw["image_id"], raw["point2d_idx"]], axis=1).astype(np.int64)
        point = _point(values[0], values[1:4], values[4:7], values[7], track)
        _add(points, point.id, point, "point3D")
    cur.finish()
    return points


_READERS = {("cameras", ".txt"): _read_cameras_txt, ("cameras", ".bin"): _read_cameras_bin,
            ("images", ".txt"): _read_images_txt, ("images", ".bin"): _read_images_bin,
            ("points3D", ".txt"): _read_points_txt, ("points3D", ".bin"): _read_points_bin}


# ------------------------------------------------------------------------------ writing

def write_model(model: Model, folder: str | Path, binary: bool) -> None:
    """Write ``model`` to ``folder`` as ``cameras/images/points3D`` ``.bin`` or ``.txt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if binary:
        (folder / "cameras.bin").write_bytes(_cameras_bin(model))
        (folder / "images.bin").write_bytes(_images_bin(model))
        (folder / "points3D.bin").write_bytes(_points_bin(model))
    else:
        (folder / "cameras.txt").write_text(_cameras_txt(model), encoding="utf-8")
        (folder / "images.txt").write_text(_images_txt(model), encoding="utf-8")
        (folder / "points3D.txt").write_text(_points_txt(model), encoding="utf-8")


def _num(x) -> str:
    return repr(float(x))  # shortest text that reads back to the same float64


def _observations(image: Image) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(image.point3d_ids, np.int64).reshape(-1)
    xys = (np.zeros((len(ids), 2)) if image.xys is None
           else np.asarray(image.xys, np.float64).reshape(-1, 2))
    if len(xys) != len(ids):
        raise ValueError(f"image {image.id}: {len(xys)} xys but {len(ids)} point3d_ids")
    return xys, ids


def _cameras_txt(model: Model) -> str:
    lines = ["# Camera list with one line of data per camera:",
             "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
             f"# Number of cameras: {len(model.cameras)}"]
    for cam in model.cameras.values():
        lines.append(" ".join([str(cam.id), cam.model, str(cam.width), str(cam.height)]
                              + [_num(p) for p in cam.params]))
    return "\n".join(lines) + "\n"


def _images_txt(model: Model) -> str:
    lines = ["# Image list with two lines of data per image:",
             "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
             "#   POINTS2D[] as (X, Y, POINT3D_ID)",
             f"# Number of images: {len(model.images)}"]
    for img in model.images.values():
        if not img.name or any(c.isspace() for c in img.name):
            raise ValueError(f"image {img.id}: name {img.name!r} cannot be written as text")
        lines.append(" ".join([str(img.id)] + [_num(v) for v in img.qvec]
                              + [_num(v) for v in img.tvec] + [str(img.camera_id), img.name]))
        xys, ids = _observations(img)
        lines.append(" ".join(f"{_num(x)} {_num(y)} {int(i)}" for (x, y), i in zip(xys, ids)))
    return "\n".join(lines) + "\n"


def _points_txt(model: Model) -> str:
    lines = ["# 3D point list with one line of data per point:",
             "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
             f"# Number of points: {len(model.points3d)}"]
    for p in model.points3d.values():
        track = [f"{int(i)} {int(j)}" for i, j in zip(p.image_ids, p.point2d_idxs)]
        lines.append(" ".join([str(p.id)] + [_num(v) for v in p.xyz]
                              + [str(int(c)) for c in p.rgb] + [_num(p.error)] + track))
    return "\n".join(lines) + "\n"


def _cameras_bin(model: Model) -> bytes:
    out = [struct.pack("<Q", len(model.cameras))]
    for cam in model.cameras.values():
        spec = MODELS_BY_NAME.get(cam.model)
        if spec is None or len(cam.params) != spec.num_params:
            raise ValueError(f"camera {cam.id}: model {cam.model} with {len(cam.params)} "
                             "parameters has no binary encoding")
        out.append(struct.pack("<IiQQ", cam.id, spec.id, cam.width, cam.height))
        out.append(np.asarray(cam.params, "<f8").tobytes())
    return b"".join(out)


def _images_bin(model: Model) -> bytes:
    out = [struct.pack("<Q", len(model.images))]
    for img in model.images.values():
        xys, ids = _observations(img)
        out.append(struct.pack("<I7dI", img.id, *np.asarray(img.qvec, float),
                               *np.asarray(img.tvec, float), img.camera_id))
        out.append(img.name.encode("utf-8") + b"\0")
        obs = np.zeros(len(ids), _OBS)
        obs["xy"], obs["id"] = xys, ids
        out.append(struct.pack("<Q", len(ids)) + obs.tobytes())
    return b"".join(out)


def _points_bin(model: Model) -> bytes:
    out = [struct.pack("<Q", len(model.points3d))]
    for p in model.points3d.values():
        track = np.zeros(len(p.image_ids), _TRACK)
        track["image_id"], track["point2d_idx"] = p.image_ids, p.point2d_idxs
        out.append(struct.pack("<Q3d3Bd", p.id, *np.asarray(p.xyz, float),
                               *(int(c) for c in p.rgb), float(p.error)))
        out.append(struct.pack("<Q", len(track)) + track.tobytes())
    return b"".join(out)
