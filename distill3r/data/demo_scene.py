"""Random layout of one demo scene: room, textures, objects, lighting and cameras (numpy only).

Every function takes a ``numpy.random.Generator``; the same generator state gives the same
scene. World frame: z up, floor at ``z = 0``, the object group around the origin and a box
room that encloses objects and cameras. Cameras are OpenCV camera-to-world 4x4 matrices
(x right, y down, z forward) on a partial orbit, looking at the object group.
The renderer (``demo.py``) turns a :class:`SceneLayout` into pybullet bodies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill3r.data.textures import make_texture, random_texture
from distill3r.geometry import look_at

WALL_MARGIN = 0.4  # metres between a camera and any wall, floor or ceiling
OBJECT_RADIUS = 0.9  # object centres lie within this distance of the scene centre (at first)


@dataclass
class Part:
    """One pybullet visual shape: ``shape`` is "box", "sphere", "cylinder" or "mesh"."""

    shape: str
    size: list[float]  # box: half extents; sphere: [r]; cylinder: [r, length]; mesh: scale xyz
    position: list[float]
    euler: list[float]  # roll, pitch, yaw (pybullet convention, R = Rz @ Ry @ Rx)
    file: str | None = None  # mesh file relative to pybullet_data
    texture: str | None = None  # key into SceneLayout.textures; None keeps the mesh's own


@dataclass
class SceneObject:
    kind: str
    parts: list[Part]
    tint: list[float]  # rgba multiplied into the texture
    aabb_min: list[float] = field(default_factory=list)
    aabb_max: list[float] = field(default_factory=list)


@dataclass
class SceneLayout:
    room: list[list[float]]  # [lo xyz, hi xyz] of the box room (floor at z=0)
    centre: list[float]  # the point the camera orbit is centred on (above the origin)
    surfaces: list[dict]  # quads: {"corners": [4][3], "uv_repeat": [u, v], "texture": key}
    objects: list[SceneObject]
    textures: dict[str, object]  # key -> uint8 [S,S,3] array or a pybullet_data file name
    light: dict
    fov_deg: float  # vertical field of view
    orbit: dict  # radius, height, start angle (rad), target height


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------
def euler_matrix(euler) -> np.ndarray:
    """Rotation of pybullet Euler angles (roll, pitch, yaw): ``Rz(yaw) @ Ry(pitch) @ Rx(roll)``."""
    r, p, y = euler
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return rz @ ry @ rx


@functools.lru_cache(maxsize=None)
def mesh_bounds(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Vertex bounding box ``(min xyz, max xyz)`` of an OBJ file."""
    verts = [line.split()[1:4] for line in Path(path).read_text().splitlines()
             if line.startswith("v ")]
    v = np.asarray(verts, np.float64)
    return tuple(v.min(0)), tuple(v.max(0))


def part_bounds(part: Part, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """World AABB of one part (the rotated local box, so slightly conservative)."""
    s = np.asarray(part.size, np.float64)
    if part.shape == "box":
        lo, hi = -s, s
    elif part.shape == "sphere":
        lo, hi = -np.full(3, s[0]), np.full(3, s[0])
    elif part.shape == "cylinder":
        lo, hi = -np.array([s[0], s[0], s[1] / 2]), np.array([s[0], s[0], s[1] / 2])
    else:
        mlo, mhi = mesh_bounds(str(Path(data_dir) / part.file))
        a, b = np.asarray(mlo) * s, np.asarray(mhi) * s
        lo, hi = np.minimum(a, b), np.maximum(a, b)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    world = corners @ euler_matrix(part.euler).T + np.asarray(part.position)
    return world.min(0), world.max(0)


def aabb_distance(point: np.ndarray, lo, hi) -> float:
    """Euclidean distance from ``point`` [3] to an axis-aligned box (0 inside)."""
    d = np.maximum(np.maximum(np.asarray(lo) - point, 0), point - np.asarray(hi))
    return float(np.sqrt((d * d).sum()))


# ----------------------------------------------------------------------------------------------
# Objects
# ----------------------------------------------------------------------------------------------
OBJECT_KINDS = ("duck", "ball", "sphere", "block", "cylinder", "jenga", "domino", "torus",
                "tray", "table")


def _object_parts(rng: np.random.Generator, kind: str, new_texture) -> list[Part]:
    """Parts of one object in its own frame (sizes in metres, before placement)."""
    u = rng.uniform
    if kind == "duck":
        return [Part("mesh", [u(0.33, 0.5)] * 3, [0, 0, 0], [np.pi / 2, 0, 0], "duck.obj")]
    if kind == "ball":
        return [Part("mesh", [u(0.45, 0.7)] * 3, [0, 0, 0], list(u(-np.pi, np.pi, 3)),
                     "soccerball.obj")]
    if kind == "sphere":
        return [Part("sphere", [u(0.22, 0.35)], [0, 0, 0], list(u(-np.pi, np.pi, 3)),
                     texture=new_texture())]
    if kind == "block":
        return [Part("box", list(u(0.15, 0.4, 3)), [0, 0, 0], [0, 0, 0], texture=new_texture())]
    if kind == "cylinder":
        roll = np.pi / 2 if rng.random() < 0.3 else 0.0
        return [Part("cylinder", [u(0.15, 0.3), u(0.4, 0.9)], [0, 0, 0], [roll, 0, 0],
                     texture=new_texture())]
    if kind == "jenga":
        return [Part("mesh", [u(0.6, 0.9), u(0.18, 0.3), u(0.15, 0.25)], [0, 0, 0], [0, 0, 0],
                     "jenga/jenga.obj")]
    if kind == "domino":
        return [Part("mesh", [u(12, 18)] * 3, [0, 0, 0], [0, 0, 0], "domino/domino.obj")]
    if kind == "torus":
        roll = np.pi / 2 if rng.random() < 0.5 else 0.0
        tex = new_texture() if rng.random() < 0.5 else None
        return [Part("mesh", [u(0.35, 0.55)] * 3, [0, 0, 0], [roll, 0, 0],
                     "torus/torus_textured.obj", tex)]
    if kind == "tray":
        return [Part("mesh", [u(0.6, 0.85)] * 3, [0, 0, 0], [0, 0, 0], "tray/tray_textured.obj")]
    if kind == "table":
        length, width, height = u(0.8, 1.1), u(0.5, 0.7), u(0.45, 0.65)
        top, leg = u(0.04, 0.06), u(0.05, 0.07)
        tex = new_texture()
        parts = [Part("box", [length / 2, width / 2, top / 2], [0, 0, height - top / 2],
                      [0, 0, 0], texture=tex)]
        for sx in (-1, 1):
            for sy in (-1, 1):
                parts.append(Part("box", [leg / 2, leg / 2, (height - top) / 2],
                                  [sx * (length / 2 - leg), sy * (width / 2 - leg),
                                   (height - top) / 2], [0, 0, 0], texture=tex))
        return parts
    raise ValueError(f"unknown object kind {kind!r}")


def _object_aabb(parts: list[Part], data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    boxes = [part_bounds(p, data_dir) for p in parts]
    return np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0)


def _place(parts: list[Part], data_dir: str, xyz, yaw: float) -> list[Part]:
    """Rotate the object by ``yaw`` about z and put its footprint centre / base at ``xyz``."""
    lo, hi = _object_aabb(parts, data_dir)
    offset = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
    rz = euler_matrix([0, 0, yaw])
    placed = []
    for p in parts:
        pos = rz @ (np.asarray(p.position) - offset) + np.asarray(xyz)
        placed.append(Part(p.shape, p.size, pos.tolist(),
                           [p.euler[0], p.euler[1], p.euler[2] + yaw], p.file, p.texture))
    return placed


def _overlaps(lo, hi, boxes, margin: float = 0.05) -> bool:
    return any(np.all(lo[:2] < b_hi[:2] + margin) and np.all(hi[:2] > b_lo[:2] - margin)
               for b_lo, b_hi in boxes)


def sample_objects(rng: np.random.Generator, count: int, data_dir: str, new_texture,
                   ) -> list[SceneObject]:
    """``count`` non-overlapping objects on the floor (at most one table; maybe one on it).
    An object that finds no free spot in 50 tries is left out."""
    objects: list[SceneObject] = []
    boxes = []
    table_top = None  # (centre xy, top height) of a table with a free top
    has_table = False
    for _ in range(count):
        kinds = [k for k in OBJECT_KINDS if k != "table" or not has_table]
        kind = str(rng.choice(kinds))
        parts = _object_parts(rng, kind, new_texture)
        tint = [*rng.uniform(0.6, 1.0, 3).tolist(), 1.0]
        on_table = table_top is not None and kind not in ("tray", "table") and rng.random() < 0.4
        for attempt in range(50):
            yaw = float(rng.uniform(-np.pi, np.pi))
            if on_table:
                xy = table_top[0] + rng.uniform(-0.1, 0.1, 2)
                xyz = [xy[0], xy[1], table_top[1]]
            else:
                reach = OBJECT_RADIUS + 0.01 * attempt  # widen the area when crowded
                r, a = reach * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
                xyz = [r * np.cos(a), r * np.sin(a), 0.0]
            placed = _place(parts, data_dir, xyz, yaw)
            lo, hi = _object_aabb(placed, data_dir)
            if on_table or not _overlaps(lo, hi, boxes):
                break
        else:
            continue  # no free spot: skip this object
        if on_table:
            table_top = None  # one object per table
        else:
            boxes.append((lo, hi))
        if kind == "table":
            table_top, has_table = (np.asarray(xyz[:2]), float(hi[2])), True
        objects.append(SceneObject(kind, placed, tint, lo.tolist(), hi.tolist()))
    return objects


# ----------------------------------------------------------------------------------------------
# Cameras, room and lighting
# ----------------------------------------------------------------------------------------------
MAX_DEPTH = 6.4  # metres; the 16-bit depth PNG stores at most 6.5535 m at 0.1 mm


def sample_cameras(rng: np.random.Generator, n: int, orbit_deg: float, objects, min_dist: float,
                   max_tries: int = 200) -> tuple[list[np.ndarray], dict, int]:
    """``n`` c2w poses on a partial orbit around the origin, each at least ``min_dist`` from
    every object AABB: a too-close proposal is re-sampled, drifting outwards by 5 mm per try.
    Returns ``(poses, orbit, rejected)``; ``ValueError`` when no pose is found."""
    orbit = {"radius": float(rng.uniform(1.6, 2.1)), "height": float(rng.uniform(0.9, 1.6)),
             "start": float(rng.uniform(0, 2 * np.pi)), "target_z": float(rng.uniform(0.2, 0.45))}
    span = np.deg2rad(orbit_deg)
    step = span / max(n - 1, 1)
    poses, rejected = [], 0
    for k in range(n):
        for attempt in range(max_tries):
            angle = orbit["start"] + k * step + rng.uniform(-0.25, 0.25) * step
            radius = orbit["radius"] + rng.uniform(-0.15, 0.15) + 0.005 * attempt
            eye = np.array([radius * np.cos(angle), radius * np.sin(angle),
                            orbit["height"] + rng.uniform(-0.15, 0.15)])
            target = np.array([*rng.uniform(-0.2, 0.2, 2),
                               orbit["target_z"] + rng.uniform(-0.1, 0.1)])
            roll = rng.uniform(-0.04, 0.04)
            if all(aabb_distance(eye, o.aabb_min, o.aabb_max) >= min_dist for o in objects):
                poses.append(look_at(eye, target, down=(0.0, 0.0, -1.0), roll=roll))
                break
            rejected += 1
        else:
            raise ValueError(f"demo.min_object_distance={min_dist}: no camera pose found that far "
                             f"from the objects after {max_tries} tries; lower it")
    return poses, orbit, rejected


def room_bounds(rng: np.random.Generator, poses, objects) -> tuple[np.ndarray, np.ndarray]:
    """A closed room around cameras and objects: ``(lo xyz, hi xyz)``, floor at z=0."""
    eyes = np.array([c[:3, 3] for c in poses])
    obj_lo = np.min([o.aabb_min for o in objects], 0) if objects else np.zeros(3)
    obj_hi = np.max([o.aabb_max for o in objects], 0) if objects else np.zeros(3)
    lo = np.minimum(np.minimum(eyes.min(0) - WALL_MARGIN, obj_lo - 0.3), -rng.uniform(1.8, 2.6, 3))
    hi = np.maximum(np.maximum(eyes.max(0) + WALL_MARGIN, obj_hi + 0.3), rng.uniform(1.8, 2.6, 3))
    lo[2] = 0.0
    hi[2] = max(eyes[:, 2].max() + WALL_MARGIN, obj_hi[2] + 0.3, rng.uniform(2.5, 3.0))
    return lo, hi


def max_view_depth(c2w: np.ndarray, lo, hi) -> float:
    """Upper bound of the z-depth any pixel can see inside the box room (max over corners)."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    return float(((corners - c2w[:3, 3]) @ c2w[:3, 2]).max())


def _surfaces(rng: np.random.Generator, lo, hi, textures: dict) -> list[dict]:
    """Floor, ceiling and four walls as quads with a texture repeat of about 1-2 m."""
    x0, y0, z0 = lo
    x1, y1, z1 = hi
    quads = {
        "floor": [[x0, y0, z0], [x1, y0, z0], [x1, y1, z0], [x0, y1, z0]],
        "ceiling": [[x0, y0, z1], [x0, y1, z1], [x1, y1, z1], [x1, y0, z1]],
        "wall_y0": [[x0, y0, z0], [x0, y0, z1], [x1, y0, z1], [x1, y0, z0]],
        "wall_x1": [[x1, y0, z0], [x1, y0, z1], [x1, y1, z1], [x1, y1, z0]],
        "wall_y1": [[x1, y1, z0], [x1, y1, z1], [x0, y1, z1], [x0, y1, z0]],
        "wall_x0": [[x0, y1, z0], [x0, y1, z1], [x0, y0, z1], [x0, y0, z0]],
    }
    tile = {"floor": rng.uniform(0.8, 1.6), "ceiling": rng.uniform(1.0, 2.0),
            "wall_a": rng.uniform(1.0, 2.0), "wall_b": rng.uniform(1.0, 2.0)}
    out = []
    for i, (name, corners) in enumerate(quads.items()):
        key = name if name in ("floor", "ceiling") else ("wall_a" if i % 2 else "wall_b")
        c = np.asarray(corners, np.float64)
        extent_u, extent_v = np.linalg.norm(c[1] - c[0]), np.linalg.norm(c[3] - c[0])
        out.append({"name": name, "corners": c.tolist(), "texture": key,
                    "uv_repeat": [extent_u / tile[key], extent_v / tile[key]]})
    return out


def sample_layout(rng: np.random.Generator, views: int, objects_min: int, objects_max: int,
                  orbit_deg: float, min_dist: float, data_dir: str, max_tries: int = 20):
    """One scene: returns ``(SceneLayout, poses [views] of c2w 4x4, rejected camera count)``."""
    textures: dict[str, object] = {}

    def new_texture() -> str:
        key = f"obj{len(textures)}"
        textures[key] = random_texture(rng, ("marble", "tiles", "checker", "wood", "dots"), 0.3)
        return key

    problem = ""
    for _ in range(max_tries):  # a layout that fails is re-sampled as a whole
        textures.clear()
        count = int(rng.integers(objects_min, objects_max + 1))
        objects = sample_objects(rng, count, data_dir, new_texture)
        try:
            poses, orbit, rejected = sample_cameras(rng, views, orbit_deg, objects, min_dist)
        except ValueError as exc:
            problem = str(exc)
            continue
        lo, hi = room_bounds(rng, poses, objects)
        if max(max_view_depth(c, lo, hi) for c in poses) < MAX_DEPTH:
            break
        problem = f"the room exceeds the {MAX_DEPTH} m depth range (min_object_distance too large?)"
    else:
        raise ValueError(f"demo: no valid layout in {max_tries} tries: {problem}")
    textures["floor"] = random_texture(rng, ("tiles", "checker", "wood", "marble", "bricks"), 0.2)
    textures["ceiling"] = make_texture(rng, str(rng.choice(["marble", "tiles"])))
    for key in ("wall_a", "wall_b"):
        textures[key] = random_texture(rng, ("marble", "bricks", "tiles", "dots", "wood"), 0.3)
    light = {"direction": [*rng.uniform(-1, 1, 2).tolist(), float(rng.uniform(0.5, 2.0))],
             "color": rng.uniform(0.85, 1.0, 3).tolist(),
             "ambient": float(rng.uniform(0.45, 0.7)), "diffuse": float(rng.uniform(0.3, 0.55)),
             "specular": float(rng.uniform(0.0, 0.15))}
    layout = SceneLayout(room=[lo.tolist(), hi.tolist()], centre=[0.0, 0.0, orbit["target_z"]],
                         surfaces=_surfaces(rng, lo, hi, textures), objects=objects,
                         textures=textures, light=light, fov_deg=float(rng.uniform(55, 68)),
                         orbit=orbit)
    return layout, poses, rejected
