"""BlendedMVS, BlendedMVS+ and BlendedMVS++ (the low-res 768x576 sets, MVSNet format).

Layout (the three sets unpacked into one root; list files at the root are ignored)::

    <root>/
    ├── BlendedMVS_list.txt                  (ignored)
    └── <scene_id>/                          24 hex digits (any folder name is accepted)
        ├── blended_images/
        │   ├── 00000000.jpg                 one view
        │   ├── 00000000_masked.jpg          same view, background blacked out
        │   └── ...
        ├── cams/
        │   ├── pair.txt                     covisibility: best neighbours of every view
        │   ├── 00000000_cam.txt             extrinsic + intrinsic (MVSNet camera file)
        │   └── ...
        └── rendered_depth_maps/
            ├── 00000000.pfm                 float32 depth rendered from the mesh
            └── ...

Views are the numbered images of ``blended_images`` (``<id>.jpg``, ``<id>`` ASCII digits;
``<id>_masked.jpg`` too); other files there are skipped with a warning. Scenes are the
non-hidden folders of the root; loose files other than ``*.txt`` are warned about. Each view
needs ``cams/<id>_cam.txt``::

    extrinsic
    r11 r12 r13 t1        4x4 world-to-camera, OpenCV camera axes (x right, y down, z forward)
    ...                   (4 rows)

    intrinsic
    fx 0 cx               3x3 K in pixels of the 768x576 image
    0 fy cy
    0 0 1

    DEPTH_MIN DEPTH_INTERVAL [DEPTH_NUM DEPTH_MAX]    (ignored)

``c2w`` is the inverse of the extrinsic. ``K`` is taken as written, i.e. read with pixel
centres at integer coordinates (the MVSNet convention; BlendedMVS does not document one).

Depth: ``rendered_depth_maps/<id>.pfm``, single-channel ``Pf`` float32 z-depth in the units
of the scene's reconstruction, the same units as the extrinsic's translation (no metric
scale: scenes are consistent up to one unknown scale each); 0, negative or non-finite =
invalid (the mesh need not cover the image). The source converts it (``native_depth`` is
False) with :func:`distill3r.data.pfm.read_pfm`.

Frame order: ``cams/pair.txt`` (first line the number of views, then per view a line with its
id and a line ``K id1 score1 id2 score2 ...`` of its best neighbours) gives a symmetric
affinity (the larger score of the two directions), walked by
:func:`distill3r.data.ordering.chain_order`; without ``pair.txt`` the chain follows the camera
poses (``-pose_distance``) and a warning is recorded. ``Frame.frame`` is the position in the
chain; the view id stays in the image file name.

Skipped scenes (reason names the file): no ``blended_images`` folder, a missing or malformed
camera file, a malformed ``pair.txt``, a missing or malformed PFM or one whose size differs
from the image's (the manifest builder).

Options: ``skip_masked`` (default true): frames use ``<id>.jpg`` and the ``_masked`` copies
are ignored; false uses ``<id>_masked.jpg`` as each view's image instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill3r.data.io import valid_depth
from distill3r.data.ordering import chain_order, pose_distance
from distill3r.data.pfm import read_pfm
from distill3r.data.sources.base import (Frame, Scene, SceneRef, Source, check_rotation,
                                         register_source)
from distill3r.geometry import invert_pose

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MASKED = "_masked"


@dataclass
class BlendedMVSOptions:
    skip_masked: bool = True  # false: use <id>_masked.jpg as each view's image


def _floats(tokens: list[str], path: Path, scene: str) -> np.ndarray:
    try:
        return np.array([float(t) for t in tokens], np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: malformed camera file: {exc} (scene {scene})") from exc


def read_cam(path: Path, scene: str) -> tuple[np.ndarray, np.ndarray]:
    """``(w2c [4,4], K [3,3])`` from an MVSNet camera file; ``ValueError`` if malformed."""
    if not path.is_file():
        raise ValueError(f"{path}: camera file not found (scene {scene})")
    try:
        tokens = path.read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable camera file: {exc} (scene {scene})") from exc
    if (len(tokens) < 27 or tokens[0].lower() != "extrinsic"
            or tokens[17].lower() != "intrinsic"):
        raise ValueError(f"{path}: malformed camera file (expected 'extrinsic', 16 numbers, "
                         f"'intrinsic', 9 numbers) (scene {scene})")
    w2c = _floats(tokens[1:17], path, scene).reshape(4, 4)
    K = _floats(tokens[18:27], path, scene).reshape(3, 3)
    if not np.all(np.isfinite(w2c)) or not np.allclose(w2c[3], [0, 0, 0, 1], atol=1e-6):
        raise ValueError(f"{path}: extrinsic is not a rigid 4x4 transform (scene {scene})")
    check_rotation(w2c[:3, :3], f"{path}: extrinsic of scene {scene}", atol=1e-3)
    if not np.allclose(K[2], [0, 0, 1], atol=1e-6):
        raise ValueError(f"{path}: intrinsic's last row must be 0 0 1 (scene {scene})")
    return w2c, K


def read_pairs(path: Path, scene: str) -> dict[int, list[tuple[int, float]]]:
    """``{view id: [(neighbour id, score), ...]}`` from an MVSNet ``pair.txt``."""
    try:
        tokens = path.read_text().split()
        count, pos = int(tokens[0]), 1
        pairs: dict[int, list[tuple[int, float]]] = {}
        for _ in range(count):
            view, k = int(tokens[pos]), int(tokens[pos + 1])
            if k < 0 or pos + 2 + 2 * k > len(tokens):
                raise ValueError(f"view {view} lists {k} neighbours past the end of the file")
            ids, scores = tokens[pos + 2:pos + 2 + 2 * k:2], tokens[pos + 3:pos + 2 + 2 * k:2]
            pairs[view] = [(int(i), float(s)) for i, s in zip(ids, scores)]
            pos += 2 + 2 * k
    except (OSError, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise ValueError(f"{path}: malformed pair file: {exc} (scene {scene})") from exc
    if pos != len(tokens):
        raise ValueError(f"{path}: malformed pair file: {len(tokens) - pos} tokens after the "
                         f"{count} views the first line announces (scene {scene})")
    return pairs


def pair_affinity(ids: list[int], pairs: dict[int, list[tuple[int, float]]]) -> np.ndarray:
    """Symmetric ``[n,n]`` affinity of the views ``ids`` (-inf where no pair is listed)."""
    index = {view: i for i, view in enumerate(ids)}
    a = np.full((len(ids), len(ids)), -np.inf)
    for view, neighbours in pairs.items():
        for other, score in neighbours:
            i, j = index.get(view), index.get(other)
            if i is not None and j is not None and i != j and np.isfinite(score):
                a[i, j] = max(a[i, j], score)
    return np.maximum(a, a.T)


@register_source
class BlendedMVSSource(Source):
    """BlendedMVS(+/++) low-res scenes; see the module docstring for the layout."""

    kind = "blendedmvs"
    native_depth = False
    Options = BlendedMVSOptions

    def find_scenes(self) -> list[SceneRef]:
        # not base.subfolders: the dataset's own list files (*.txt) live at the root and are
        # skipped without a warning on every build
        refs = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_dir():
                refs.append(SceneRef(path.name, path))
            elif path.suffix.lower() != ".txt":  # the dataset's list files live here
                self.warn(f"{path}: not a scene folder, skipped")
        return refs

    def _views(self, ref: SceneRef) -> dict[int, str]:
        """``{view id: file stem}`` of the numbered images in ``blended_images``."""
        folder = ref.path / "blended_images"
        if not folder.is_dir():
            raise ValueError(f"{folder}: image folder not found (scene {ref.name})")
        views: dict[int, str] = {}
        for path in sorted(folder.iterdir()):
            stem = path.stem[:-len(_MASKED)] if path.stem.endswith(_MASKED) else path.stem
            # isascii: isdigit() also accepts digits int() cannot parse (e.g. superscripts)
            if (path.suffix.lower() not in _IMAGE_SUFFIXES or not stem.isascii()
                    or not stem.isdigit()):
                self.warn(f"{path}: not a numbered view image, skipped (scene {ref.name})")
                continue
            views.setdefault(int(stem), stem)
        return views

    def _image(self, ref: SceneRef, stem: str) -> Path:
        name = stem if self.options.skip_masked else stem + _MASKED
        folder = ref.path / "blended_images"
        for suffix in _IMAGE_SUFFIXES:
            if (folder / (name + suffix)).is_file():
                return folder / (name + suffix)
        return folder / (name + ".jpg")  # missing: check_scene names it

    def _order(self, ref: SceneRef, ids: list[int], c2ws: list[np.ndarray]) -> list[int]:
        path = ref.path / "cams" / "pair.txt"
        if path.is_file():
            return chain_order(pair_affinity(ids, read_pairs(path, ref.name)))
        self.warn(f"{path}: pair file not found, frames ordered by camera poses "
                  f"(scene {ref.name})")
        return chain_order(-pose_distance(np.stack(c2ws)))

    def read_scene(self, ref: SceneRef) -> Scene:
        views = self._views(ref)
        ids = sorted(views)
        cams = [read_cam(ref.path / "cams" / f"{views[i]}_cam.txt", ref.name) for i in ids]
        c2ws = [invert_pose(w2c) for w2c, _ in cams]
        order = self._order(ref, ids, c2ws) if ids else []
        frames = []
        for position, k in enumerate(order):
            stem = views[ids[k]]
            frames.append(Frame(frame=position, image=self._image(ref, stem),
                                depth=ref.path / "rendered_depth_maps" / f"{stem}.pfm",
                                K=cams[k][1], c2w=c2ws[k], extra={"scene": ref.name}))
        return Scene(ref.name, ref.path, frames)

    def read_depth(self, frame: Frame) -> np.ndarray:
        scene = frame.extra.get("scene", "?")
        try:
            depth = read_pfm(frame.depth)
        except ValueError as exc:
            raise ValueError(f"{exc} (scene {scene})") from exc
        if depth.ndim != 2:
            raise ValueError(f"{frame.depth}: depth must be a single-channel 'Pf' map, got "
                             f"{depth.shape[2]} channels (scene {scene})")
        return valid_depth(depth)
