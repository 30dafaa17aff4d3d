"""The viser scene of a :class:`~distill3r.viewer.scene.ViewScene`, live or as one HTML file.

Scene tree (viser's OpenCV camera convention: +z forward, +x right, +y down, as the points):

- ``/views/NNNN/points``: the points of view ``NNNN`` (coloured from its image);
- ``/views/NNNN/camera``: its camera frustum (vertical field of view and aspect from ``K``)
  showing its image, posed by ``c2w``.

Live (:class:`LiveViewer`, :func:`serve`): a GUI with the confidence-percentile slider (the
points drawn are those at or above that percentile of the loaded points' local confidence;
``infer`` already dropped the ones below its own ``conf_percentile``), a checkbox per view
(points and camera), a camera toggle, a point-size slider and the count of points drawn.

Static (:func:`export_html`): viser's recording embedded in its own client build (one HTML
file, no network, no server). A recording carries no GUI, so there the percentile is the
playback timeline: the cloud of each view is split into ``steps`` confidence bands, and at time
``k`` the bands below percentile ``100 * k / steps`` are hidden (the player autoplays and loops;
pause it and drag the timeline); views are toggled in the player's scene-tree panel.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distill3r.atomic import replacing
from distill3r.viewer.scene import ViewScene, confidence_threshold

if TYPE_CHECKING:  # viser is imported lazily: only the viewer needs it
    import viser


def view_node(i: int) -> str:
    return f"/views/{i:04d}"


def _spread(points: np.ndarray) -> tuple[np.ndarray, float]:
    """``(median point, 90th percentile of the distances from it)`` of ``points [M,3]``."""
    target = np.median(points, axis=0)
    return target, max(float(np.percentile(np.linalg.norm(points - target, axis=1), 90)), 1e-6)


def scene_scale(scene: ViewScene) -> tuple[float, float]:
    """``(frustum size, point size)`` in scene units: a tenth of the median distance of the
    points from view 0 (at most a quarter of the cloud's spread), and 1.5 pixel footprints at
    the median depth."""
    if len(scene.points) == 0:
        return 0.1, 0.01
    dist = float(np.median(np.linalg.norm(scene.points, axis=1)))
    depth = float(np.median(np.abs(scene.points[:, 2])))
    frustum = min(0.1 * dist, 0.25 * _spread(scene.points)[1])
    return max(frustum, 1e-4), max(1.5 * depth / float(scene.K[1, 1]), 1e-5)


def _camera_pose(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(wxyz, position)`` of a ``[4,4]`` camera-to-world pose."""
    import viser.transforms as vtf

    return vtf.SO3.from_matrix(c2w[:3, :3]).wxyz, c2w[:3, 3]


def _setup_view(server: "viser.ViserServer", scene: ViewScene) -> None:
    """Up = -y (OpenCV); the initial camera behind and above view 0 (by 0.6 and 0.35 of the
    points' median distance, as the preview PNG's), looking at the cloud's median point."""
    server.scene.set_up_direction("-y")
    if len(scene.points) == 0:
        return
    target = np.median(scene.points, axis=0)
    dist = max(float(np.median(np.linalg.norm(scene.points, axis=1))), 1e-6)
    server.initial_camera.position = (0.0, -0.35 * dist, -0.6 * dist)
    server.initial_camera.look_at = tuple(float(v) for v in target)
    server.initial_camera.up = (0.0, -1.0, 0.0)


def add_cameras(server: "viser.ViserServer", scene: ViewScene, frustum: float) -> list:
    """One frustum per view under ``/views/NNNN/camera``; returns their handles."""
    H, W = scene.size
    fov = 2 * math.atan(H / (2 * float(scene.K[1, 1])))
    handles = []
    for i in range(scene.num_views):
        wxyz, position = _camera_pose(scene.c2w[i])
        handles.append(server.scene.add_camera_frustum(
            f"{view_node(i)}/camera", fov=fov, aspect=W / H, scale=frustum,
            thickness=0.03 * frustum, color=(230, 120, 20) if i == 0 else (40, 90, 200),
            image=scene.thumbnails[i], format="jpeg", jpeg_quality=85, wxyz=wxyz,
            position=position))
    return handles


class LiveViewer:
    """The live scene and GUI on ``server`` (see the module docstring).

    ``percentile`` (the slider), ``views`` (the checkboxes) and ``points_drawn()`` are the
    state the browser shows; setting ``percentile.value`` or a checkbox from Python updates
    every connected browser as the GUI does."""

    def __init__(self, server: "viser.ViserServer", scene: ViewScene,
                 percentile: float = 0.0) -> None:
        self.server, self.scene = server, scene
        self._lock = threading.Lock()
        frustum, point_size = scene_scale(scene)
        _setup_view(server, scene)
        self._by_view = [np.flatnonzero(scene.view == i) for i in range(scene.num_views)]
        self.cameras = add_cameras(server, scene, frustum)
        self.clouds = [server.scene.add_point_cloud(
            f"{view_node(i)}/points", points=scene.points[idx], colors=scene.colors[idx],
            point_size=point_size, point_shape="rounded", precision="float32",
            point_shading="flat") for i, idx in enumerate(self._by_view)]
        gui = server.gui
        gui.add_markdown(f"**{scene.name}**: {scene.num_views} views, {len(scene.points):,} "
                         f"of the PLY's {scene.total_points:,} points loaded (infer kept local "
                         f"confidence >= its {scene.conf_percentile:g}th percentile)")
        self.count = gui.add_markdown("")
        self.percentile = gui.add_slider("confidence pct", min=0, max=99, step=1,
                                         initial_value=float(percentile),
                                         hint="draw the points at or above this percentile of "
                                              "local confidence")
        self._base_point_size = point_size
        self.point_size = gui.add_slider("point size x", min=0.25, max=4.0, step=0.25,
                                         initial_value=1.0)
        self.show_cameras = gui.add_checkbox("cameras", True)
        with gui.add_folder("views", expand_by_default=scene.num_views <= 32):
            self.views = [gui.add_checkbox(f"{i}: {name}", True)
                          for i, name in enumerate(scene.image_names)]
        self.percentile.on_update(lambda _: self.refresh())
        self.point_size.on_update(lambda _: self._set_point_size())
        self.show_cameras.on_update(lambda _: self.refresh())
        for box in self.views:
            box.on_update(lambda _: self.refresh())
        self.refresh()

    def _set_point_size(self) -> None:
        for cloud in self.clouds:
            cloud.point_size = self._base_point_size * float(self.point_size.value)

    def refresh(self) -> None:
        """Apply the slider and the toggles to the scene nodes."""
        with self._lock, self.server.atomic():
            threshold = confidence_threshold(self.scene.confidence, self.percentile.value)
            for i, idx in enumerate(self._by_view):
                shown = self.views[i].value
                kept = idx[self.scene.confidence[idx] >= threshold]
                cloud = self.clouds[i]
                if shown and len(kept) != len(cloud.points):
                    cloud.points = self.scene.points[kept]
                    cloud.colors = self.scene.colors[kept]
                cloud.visible = shown
                self.cameras[i].visible = shown and self.show_cameras.value
            self.count.content = f"{self.points_drawn():,} points drawn"

    def points_drawn(self) -> int:
        """Points in the visible clouds (what the browsers draw)."""
        return sum(len(c.points) for c in self.clouds if c.visible)


def start_server(host: str = "127.0.0.1", port: int = 8080) -> "viser.ViserServer":
    import viser

    return viser.ViserServer(host=host, port=port, verbose=False)


def serve(scene: ViewScene, host: str = "127.0.0.1", port: int = 8080,
          percentile: float = 0.0) -> tuple["viser.ViserServer", LiveViewer]:
    """Start a viser server on ``host:port`` showing ``scene``; returns it and the viewer
    (``server.stop()`` ends it)."""
    server = start_server(host, port)
    return server, LiveViewer(server, scene, percentile)


def band_edges(confidence: np.ndarray, steps: int) -> np.ndarray:
    """``steps + 1`` confidence edges: ``-inf``, the ``100 k / steps`` percentiles for
    ``k = 1 .. steps - 1``, ``inf``; band ``k`` holds ``edges[k] <= c < edges[k+1]``."""
    if steps < 1:
        raise ValueError(f"static steps must be >= 1, got {steps}")
    inner = [confidence_threshold(confidence, 100 * k / steps) for k in range(1, steps)]
    return np.array([-np.inf, *inner, np.inf])


def export_html(scene: ViewScene, path: str | Path, steps: int = 10,
                seconds_per_step: float = 1.0) -> Path:
    """Write ``scene`` as one self-contained HTML file (see the module docstring) to ``path``
    (atomically); returns the path. A viser server runs on a free loopback port meanwhile."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds per step must be > 0, got {seconds_per_step}")
    path = Path(path)
    edges = band_edges(scene.confidence, steps)
    server = start_server(port=0)
    try:
        frustum, point_size = scene_scale(scene)
        _setup_view(server, scene)
        add_cameras(server, scene, frustum)
        band = np.searchsorted(edges, scene.confidence, side="right") - 1
        bands: list[list] = [[] for _ in range(steps)]
        for i in range(scene.num_views):
            for k in range(steps):
                idx = np.flatnonzero((scene.view == i) & (band == k))
                if len(idx):
                    bands[k].append(server.scene.add_point_cloud(
                        f"{view_node(i)}/points/band{k:02d}", points=scene.points[idx],
                        colors=scene.colors[idx], point_size=point_size,
                        point_shape="rounded", precision="float32", point_shading="flat"))
        serializer = server.get_scene_serializer()
        for k in range(1, steps):
            serializer.insert_sleep(seconds_per_step)
            for handle in bands[k - 1]:
                handle.visible = False
        if steps > 1:
            serializer.insert_sleep(seconds_per_step)
        html = serializer.as_html()
    finally:
        server.stop()
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    return path
