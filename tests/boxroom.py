"""Analytic test scenes: a closed box room with a cube, rendered by ray casting (exact geometry,
no renderer). Used to build small manifests for the cache tests.

World frame: y points down (floor at ``room_hi[1]``); cameras are OpenCV (x right, y down,
z forward) looking at the cube from a partial orbit, so views overlap and see depth edges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill3r.data.io import write_depth_png, write_image
from distill3r.data.manifest import FrameRecord, write_manifest
from distill3r.geometry import look_at


def random_scene(rng: np.random.Generator) -> dict:
    half = rng.uniform(0.25, 0.45)
    centre = np.array([rng.uniform(-0.3, 0.3), rng.uniform(0.2, 0.6), rng.uniform(-0.3, 0.3)])
    return {"room_lo": np.array([-2.0, -1.2, -2.0]), "room_hi": np.array([2.0, 1.2, 2.0]),
            "cube_lo": centre - half, "cube_hi": centre + half, "hue": rng.uniform(0, 1, 3)}


def camera(rng: np.random.Generator, scene: dict, i: int, frames: int, H: int, W: int):
    """``(K, c2w)`` of frame ``i``: an orbit of ~120 degrees around the cube, random jitter."""
    angle = np.deg2rad(-60 + 120 * i / max(1, frames - 1)) + rng.uniform(-0.1, 0.1)
    radius = rng.uniform(1.3, 1.6)
    target = (scene["cube_lo"] + scene["cube_hi"]) / 2 + rng.uniform(-0.1, 0.1, 3)
    centre = np.array([radius * np.sin(angle), rng.uniform(-0.4, 0.0), -radius * np.cos(angle)])
    f = W * rng.uniform(0.6, 0.9)
    K = np.array([[f, 0, (W - 1) / 2 + rng.uniform(-2, 2)],
                  [0, f, (H - 1) / 2 + rng.uniform(-2, 2)], [0, 0, 1.0]])
    return K, look_at(centre, target)


def _slabs(origin, d, lo, hi):
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - origin) / d, (hi - origin) / d
    return np.minimum(t1, t2), np.maximum(t1, t2)


def render_view(scene: dict, K: np.ndarray, c2w: np.ndarray, H: int, W: int):
    """Ray-cast one view: ``(rgb uint8 [H,W,3], z-depth float64 [H,W], world points [H,W,3])``."""
    v, u = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64),
                       indexing="ij")
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    d = rays @ c2w[:3, :3].T  # world direction with camera z = 1, so t is the z-depth
    o = c2w[:3, 3]
    _, t_exit = _slabs(o, d, scene["room_lo"], scene["room_hi"])
    t_room = t_exit.min(-1)
    tmin, tmax = _slabs(o, d, scene["cube_lo"], scene["cube_hi"])
    t_in, t_out = tmin.max(-1), tmax.min(-1)
    hit_cube = (t_out >= t_in) & (t_in > 0)
    depth = np.where(hit_cube, np.minimum(t_in, t_room), t_room)
    points = o + depth[..., None] * d
    checker = (np.floor(points * 4).sum(-1) % 2)[..., None]
    ramp = 0.5 + 0.5 * np.cos(points * np.array([1.3, 2.1, 1.7]))
    colour = np.where(hit_cube[..., None], scene["hue"], ramp)
    rgb = np.clip(255 * colour * (0.55 + 0.45 * checker), 0, 255).astype(np.uint8)
    return rgb, depth, points


def make_box_room_manifest(root: str | Path, num_scenes: int = 3, frames: int = 6,
                           height: int = 48, width: int = 64, seed: int = 0,
                           val_scenes: int = 1, dataset: str = "boxroom") -> Path:
    """Render scenes to ``root/<scene>/{rgb,depth}/`` and write ``root/manifest.csv``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    records = []
    for s in range(num_scenes):
        scene = random_scene(rng)
        name = f"scene_{s:04d}"
        split = "val" if s >= num_scenes - val_scenes else "train"
        for i in range(frames):
            K, c2w = camera(rng, scene, i, frames, height, width)
            rgb, depth, _ = render_view(scene, K, c2w, height, width)
            image = root / name / "rgb" / f"{i:06d}.png"
            depth_path = root / name / "depth" / f"{i:06d}.png"
            write_image(image, rgb)
            write_depth_png(depth_path, depth)
            records.append(FrameRecord(dataset=dataset, split=split, scene=name, frame=i,
                                       image=image, depth=depth_path, K=K, c2w=c2w))
    manifest = root / "manifest.csv"
    write_manifest(records, manifest)
    return manifest
