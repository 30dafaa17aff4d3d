"""The built-in demo dataset: closed textured rooms rendered with pybullet's CPU renderer.

``render_demo(out_dir, params)`` writes one folder per scene (the ``demo`` source reads it)::

    <out_dir>/scene_0000/rgb/000000.png     RGB uint8 [H,W,3]
    <out_dir>/scene_0000/depth/000000.png   uint16 z-depth, 0.1 mm per unit, 0 = invalid
    <out_dir>/scene_0000/cameras.json       {"width","height","frames":[{"frame","image","depth",
                                             "K" 3x3 pixels, "c2w" 4x4 OpenCV camera-to-world}]}
    <out_dir>/scene_0000/scene.json         layout (room, objects with AABBs, light), params hash

Ground truth is exact: z-depth is linearised from TinyRenderer's depth buffer
(``z = far*near / (far - (far-near)*d)``), ``K`` has ``fx = P00*W/2``, ``fy = P11*H/2`` and the
TinyRenderer principal point ``cx = W/2, cy = H/2 - 1``; the view matrix passed to pybullet is
``diag(1,-1,-1,1) @ w2c`` (OpenCV -> OpenGL camera). Scene ``i`` is seeded from ``(seed, i)`` only,
so it is identical whichever worker renders it. Each scene is rendered into a hidden temporary
folder and renamed when complete; a rerun keeps complete scenes whose parameters match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from distill3r.progress import progress_bar

from distill3r.config import DemoParams
from distill3r.data.demo_scene import SceneLayout, sample_layout
from distill3r.data.io import write_depth_png, write_image

log = logging.getLogger(__name__)

RENDER_VERSION = 1  # bump when the scene generator changes: invalidates rendered scenes
NEAR, FAR = 0.05, 20.0  # clip planes in metres (rooms are closed, so nothing reaches FAR)
SCENE_RE = re.compile(r"^scene_(\d{4,})$")
TMP_PREFIX = ".tmp-"
_SCENE_KEYS = ("height", "width", "views_per_scene", "seed", "objects_min", "objects_max",
               "min_object_distance", "orbit_degrees")


def scene_name(index: int) -> str:
    return f"scene_{index:04d}"


def scene_config(params: DemoParams, index: int) -> dict:
    """Everything that determines scene ``index`` (not num_scenes or workers)."""
    cfg = {k: getattr(params, k) for k in _SCENE_KEYS}
    return {**cfg, "index": index, "render_version": RENDER_VERSION}


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def intrinsics(fov_deg: float, width: int, height: int) -> tuple[np.ndarray, list[float]]:
    """``(K [3,3], pybullet projection matrix as a flat list)`` for a vertical FOV."""
    import pybullet as pb

    proj = pb.computeProjectionMatrixFOV(fov_deg, width / height, NEAR, FAR)
    P = np.asarray(proj, np.float64).reshape(4, 4).T
    K = np.array([[P[0, 0] * width / 2, 0.0, width / 2],
                  [0.0, P[1, 1] * height / 2, height / 2 - 1],
                  [0.0, 0.0, 1.0]])
    return K, list(proj)


class _Renderer:
    """One private pybullet DIRECT client holding the bodies of one scene."""

    def __init__(self, layout: SceneLayout, data_dir: str, texture_dir: Path):
        import pybullet as pb

        self.pb = pb
        self.cid = pb.connect(pb.DIRECT)
        self.layout = layout
        try:
            self._textures = self._load_textures(data_dir, texture_dir)
            self._build(data_dir)
        except Exception:
            pb.disconnect(self.cid)
            raise

    def _load_textures(self, data_dir: str, texture_dir: Path) -> dict[str, int]:
        ids = {}
        for key, tex in self.layout.textures.items():
            if isinstance(tex, str):
                path = str(Path(data_dir) / tex)
            else:
                path = str(texture_dir / f"{key}.png")
                write_image(path, tex)
            ids[key] = self.pb.loadTexture(path, physicsClientId=self.cid)
        return ids

    def _body(self, visual: int, position, orientation, texture: str | None, rgba) -> None:
        pb, cid = self.pb, self.cid
        body = pb.createMultiBody(baseMass=0, baseCollisionShapeIndex=-1,
                                  baseVisualShapeIndex=visual, basePosition=position,
                                  baseOrientation=orientation, physicsClientId=cid)
        kwargs = {"textureUniqueId": self._textures[texture]} if texture else {}
        pb.changeVisualShape(body, -1, rgbaColor=rgba, physicsClientId=cid, **kwargs)

    def _build(self, data_dir: str) -> None:
        pb, cid = self.pb, self.cid
        lo, hi = (np.asarray(x) for x in self.layout.room)
        for surf in self.layout.surfaces:
            c = np.asarray(surf["corners"])
            normal = np.cross(c[1] - c[0], c[3] - c[0])
            normal /= np.linalg.norm(normal)
            if normal @ ((lo + hi) / 2 - c[0]) < 0:
                normal = -normal  # face into the room
            ru, rv = surf["uv_repeat"]
            vis = pb.createVisualShape(
                pb.GEOM_MESH, vertices=c.tolist(), indices=[0, 1, 2, 0, 2, 3],
                uvs=[[0, 0], [ru, 0], [ru, rv], [0, rv]], normals=[normal.tolist()] * 4,
                physicsClientId=cid)
            self._body(vis, [0, 0, 0], [0, 0, 0, 1], surf["texture"], [1, 1, 1, 1])
        for obj in self.layout.objects:
            for part in obj.parts:
                self._body(self._visual(part, data_dir), part.position,
                           pb.getQuaternionFromEuler(part.euler), part.texture, obj.tint)

    def _visual(self, part, data_dir: str) -> int:
        pb, cid = self.pb, self.cid
        if part.shape == "box":
            return pb.createVisualShape(pb.GEOM_BOX, halfExtents=part.size, physicsClientId=cid)
        if part.shape == "sphere":
            return pb.createVisualShape(pb.GEOM_SPHERE, radius=part.size[0], physicsClientId=cid)
        if part.shape == "cylinder":
            return pb.createVisualShape(pb.GEOM_CYLINDER, radius=part.size[0],
                                        length=part.size[1], physicsClientId=cid)
        return pb.createVisualShape(pb.GEOM_MESH, fileName=str(Path(data_dir) / part.file),
                                    meshScale=part.size, physicsClientId=cid)

    def render(self, c2w: np.ndarray, width: int, height: int, proj: list[float]):
        """RGB uint8 ``[H,W,3]`` and metric z-depth float32 ``[H,W]`` (0 = invalid)."""
        pb, light = self.pb, self.layout.light
        view_gl = np.diag([1.0, -1.0, -1.0, 1.0]) @ np.linalg.inv(c2w)  # OpenCV -> OpenGL
        _, _, rgba, zbuf, _ = pb.getCameraImage(
            width, height, viewMatrix=view_gl.T.reshape(-1).tolist(), projectionMatrix=proj,
            renderer=pb.ER_TINY_RENDERER, shadow=0, lightDirection=light["direction"],
            lightColor=light["color"], lightAmbientCoeff=light["ambient"],
            lightDiffuseCoeff=light["diffuse"], lightSpecularCoeff=light["specular"],
            flags=pb.ER_NO_SEGMENTATION_MASK, physicsClientId=self.cid)
        rgb = np.asarray(rgba, np.uint8).reshape(height, width, 4)[..., :3]
        d = np.asarray(zbuf, np.float64).reshape(height, width)
        depth = FAR * NEAR / (FAR - (FAR - NEAR) * d)
        depth[(d >= 1.0) | ~np.isfinite(depth)] = 0.0
        return np.ascontiguousarray(rgb), depth.astype(np.float32)

    def close(self) -> None:
        self.pb.disconnect(self.cid)


def render_scene(out_dir: str | Path, params: DemoParams, index: int) -> str:
    """Render scene ``index`` into ``out_dir/scene_NNNN`` atomically; returns the scene name."""
    import pybullet_data

    out_dir = Path(out_dir)
    name = scene_name(index)
    cfg = scene_config(params, index)
    data_dir = pybullet_data.getDataPath()
    rng = np.random.default_rng([params.seed, index])
    layout, poses, rejected = sample_layout(
        rng, params.views_per_scene, params.objects_min, params.objects_max,
        params.orbit_degrees, params.min_object_distance, data_dir)
    W, H = params.width, params.height
    K, proj = intrinsics(layout.fov_deg, W, H)
    tmp = out_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix="distill3r-tex-") as tex_dir:
            renderer = _Renderer(layout, data_dir, Path(tex_dir))
            try:
                frames = []
                for k, c2w in enumerate(poses):
                    rgb, depth = renderer.render(c2w, W, H, proj)
                    write_image(tmp / "rgb" / f"{k:06d}.png", rgb)
                    write_depth_png(tmp / "depth" / f"{k:06d}.png", depth)
                    frames.append({"frame": k, "image": f"rgb/{k:06d}.png",
                                   "depth": f"depth/{k:06d}.png", "K": K.tolist(),
                                   "c2w": np.asarray(c2w).tolist()})
            finally:
                renderer.close()
        _write_json(tmp / "cameras.json", {"width": W, "height": H, "frames": frames})
        meta = {"scene": name, "config": cfg, "params_hash": config_hash(cfg),
                "rejected_cameras": rejected, "room": layout.room, "fov_deg": layout.fov_deg,
                "light": layout.light, "orbit": layout.orbit,
                "objects": [{"kind": o.kind, "aabb_min": o.aabb_min, "aabb_max": o.aabb_max}
                            for o in layout.objects]}
        _write_json(tmp / "scene.json", meta)  # written last: marks the scene complete
        final = out_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return name


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def is_complete(scene_dir: Path, params: DemoParams, index: int) -> bool:
    """True if ``scene_dir`` holds every file of scene ``index`` rendered with these params."""
    try:
        meta = json.loads((scene_dir / "scene.json").read_text())
        cams = json.loads((scene_dir / "cameras.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("params_hash") != config_hash(scene_config(params, index)):
        return False
    frames = cams.get("frames", [])
    return len(frames) == params.views_per_scene and all(
        (scene_dir / f["image"]).is_file() and (scene_dir / f["depth"]).is_file() for f in frames)


def _clean_stale(out_dir: Path, num_scenes: int) -> None:
    """Remove temporary folders of interrupted runs and scenes beyond ``num_scenes``."""
    for path in sorted(out_dir.iterdir()):
        match = SCENE_RE.match(path.name)
        if path.is_dir() and path.name.startswith(TMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif match and path.is_dir() and int(match.group(1)) >= num_scenes:
            log.info("removing %s (demo.num_scenes=%d)", path, num_scenes)
            shutil.rmtree(path)


def _task(args: tuple) -> str:
    return render_scene(*args)


def render_demo(out_dir: str | Path, params: DemoParams, progress: bool = True) -> list[str]:
    """Render ``params.num_scenes`` scenes into ``out_dir`` (skipping complete, matching ones)
    with ``params.workers`` processes; returns the scene names in order."""
    params.validate("demo")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir, params.num_scenes)
    names = [scene_name(i) for i in range(params.num_scenes)]
    todo = [i for i in range(params.num_scenes)
            if not is_complete(out_dir / names[i], params, i)]
    log.info("demo: %d scene(s) to render, %d up to date", len(todo), len(names) - len(todo))
    tasks = [(str(out_dir), params, i) for i in todo]
    with progress_bar(total=len(tasks), desc="render demo", unit="scene",
                      disable=not progress) as bar:
        if params.workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                _task(task)
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked state
            with ctx.Pool(min(params.workers, len(tasks))) as pool:
                for _ in pool.imap_unordered(_task, tasks):
                    bar.update()
    return names
