"""MegaDepth v1, laid out as the D2-Net preprocessing leaves it (most downstream projects).

Layout::

    <root>/
    ├── MegaDepth_v1/                        options.depth_root (the release's
    │   └── <scene_id>/                      phoenix/S6/zl548/MegaDepth_v1 folder, moved or not)
    │       └── dense0/                      options.images_subdir
    │           ├── imgs/<name>.jpg          undistorted photos
    │           └── depths/<stem>.h5         HDF5 dataset "depth", float32 [H,W] (or a mask)
    └── Undistorted_SfM/                     options.sfm_dir (D2-Net's undistort_reconstructions)
        └── <scene_id>/
            └── sparse-txt/                  options.model_subdir; .txt or .bin model
                ├── cameras.txt              PINHOLE cameras
                ├── images.txt               world-to-camera poses; NAME = the imgs file name
                └── points3D.txt             not read

A scene is any ``<scene_id>`` folder under either ``MegaDepth_v1`` or ``Undistorted_SfM``; a
scene lacking its half of the layout is skipped and named. Scene name = ``<scene_id>``.

Files read: the COLMAP model's cameras and images (:mod:`distill3r.data.colmap_model`; the
observations' POINT3D_IDs in images.txt give the covisibility, so points3D is never parsed),
``imgs/<NAME>`` and ``depths/<NAME without suffix>.h5`` for every image of the model found in
``imgs``.

Depth: the h5 dataset ``depth``, z-depth of the MVS reconstruction in the SfM model's units
(no metric scale: each scene is consistent up to its own unknown scale); 0, negative or
non-finite = invalid. It must be a 2-D numeric (or boolean) HDF5 dataset of the camera's (and
image's) size.
The source converts it to ``.npy`` (``native_depth`` False); ``h5py`` is imported only then.

Masks: some ``depths/*.h5`` files of MegaDepth v1 hold a foreground/background (ordinal) mask
instead of depth. D2-Net's preprocessing drops them by file size (< 100 KB); this source looks
at the content instead: a map whose valid pixels take at most ``MASK_VALUES`` (2) distinct
values is a mask (real MVS depth takes thousands), and a map with no valid pixel is useless.
Either drops that one frame (:class:`~distill3r.data.sources.base.SkipFrame`: the manifest
report's warnings name the file) and keeps the scene.

Poses and intrinsics: COLMAP world-to-camera ``(qvec w,x,y,z; tvec)`` with OpenCV axes, so
``c2w`` is its inverse; ``K`` from the PINHOLE/SIMPLE_PINHOLE camera with 0.5 subtracted from
the principal point (COLMAP's top-left pixel centre is (0.5, 0.5), the project's (0, 0)). A
distorted camera skips the scene.

Frame order: photo collections have no capture order, so frames follow a covisibility chain
(:func:`distill3r.data.ordering.chain_order` on the number of 3D points two images share,
from the images' POINT3D_IDs), not the file names. ``Frame.frame`` is the chain position.

Skipped with a warning (one per scene): images of the model not in ``imgs`` (the SfM model
also holds photos of other dense folders), photos in ``imgs`` the model lacks, and, with
``require_depth``, images without an h5 depth; frames whose h5 holds a mask (see above).
Skipped scenes (reason names the file): no model, a malformed cameras or images file, a
distorted camera, no ``imgs`` folder, no usable image, an h5 file that is unreadable, lacks
the ``depth`` dataset, holds a group or non-numeric data there, or differs in size from its
camera.

Options (defaults): ``images_subdir`` ("dense0"), ``sfm_dir`` ("Undistorted_SfM"),
``model_subdir`` ("sparse-txt"), ``depth_root`` ("MegaDepth_v1"), ``require_depth`` (true:
frames without an h5 depth are dropped; false: kept without depth).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill3r.data import colmap_model as cm
from distill3r.data.io import valid_depth
from distill3r.data.ordering import chain_order
from distill3r.data.sources.base import (Frame, Scene, SceneRef, SkipFrame, Source,
                                         register_source, subfolders)
from distill3r.data.sources.colmap import (check_depth_size, colmap_frame, images_on_disk,
                                           name_listing, read_scene_model)

MASK_VALUES = 2  # a map whose valid pixels take at most this many values is a mask


@dataclass
class MegaDepthOptions:
    images_subdir: str = "dense0"
    sfm_dir: str = "Undistorted_SfM"
    model_subdir: str = "sparse-txt"  # text or binary model
    depth_root: str = "MegaDepth_v1"
    require_depth: bool = True  # drop frames without an h5 depth map


def read_h5_depth(path: Path, scene: str) -> np.ndarray:
    """The ``depth`` dataset of a MegaDepth h5 file as float32 (invalid -> 0); ``ValueError``
    naming the file and scene for anything else than a 2-D numeric dataset."""
    import h5py  # only this source needs it

    try:
        with h5py.File(path, "r") as f:
            depth = _depth_dataset(f, h5py)
    except OSError as exc:
        raise ValueError(f"{path}: unreadable h5 depth file: {exc} (scene {scene})") from exc
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{path}: {exc} (scene {scene})") from exc
    return valid_depth(depth)


def _depth_dataset(f, h5py) -> np.ndarray:
    """``f["depth"]`` read, after checking it is a 2-D dataset of numbers."""
    data = f.get("depth")
    if data is None:
        raise ValueError(f"no 'depth' dataset in the h5 file (has {sorted(f.keys())})")
    if not isinstance(data, h5py.Dataset):
        raise ValueError(f"'depth' in the h5 file is a {type(data).__name__}, not a dataset")
    if data.dtype.kind not in "fiub":  # booleans: a mask, dropped by the caller
        raise ValueError(f"'depth' has dtype {data.dtype}, not numbers")
    if len(data.shape) != 2:
        raise ValueError(f"depth must be 2-D, got shape {data.shape}")
    return np.asarray(data[()], np.float32)


def valid_values(depth: np.ndarray, limit: int) -> int:
    """How many distinct values the valid pixels (> 0) of ``depth`` take, counted up to
    ``limit + 1`` (linear time, no sort)."""
    values = depth[depth > 0]
    count = 0
    while values.size and count <= limit:
        values = values[values != values[0]]
        count += 1
    return count


@register_source
class MegaDepthSource(Source):
    """MegaDepth v1 scenes; see the module docstring for the layout."""

    kind = "megadepth"
    native_depth = False
    Options = MegaDepthOptions

    def _scene_folders(self, scene_id: str) -> tuple[Path, Path]:
        """``(dense folder with imgs/ and depths/, model folder)`` of a scene."""
        o = self.options
        return (self.root / o.depth_root / scene_id / o.images_subdir,
                self.root / o.sfm_dir / scene_id / o.model_subdir)

    def find_scenes(self) -> list[SceneRef]:
        o = self.options
        tops = [self.root / o.depth_root, self.root / o.sfm_dir]
        if not any(top.is_dir() for top in tops):
            raise ValueError(f"{self.root}: neither {o.depth_root}/ nor {o.sfm_dir}/ found "
                             f"(source kind {self.kind!r})")
        ids = sorted({folder.name for top in tops if top.is_dir()
                      for folder in subfolders(self, top)})
        return [SceneRef(i, self.root / o.depth_root / i) for i in ids]

    def read_scene(self, ref: SceneRef) -> Scene:
        dense, model_folder = self._scene_folders(ref.name)
        if not cm.has_model(model_folder):
            raise ValueError(f"{model_folder / 'images.txt'}: COLMAP model not found (needs "
                             f"cameras and images .txt or .bin) (scene {ref.name})")
        model = read_scene_model(model_folder, ref.name)
        images = images_on_disk(self, model, dense / "imgs", ref.name)
        if self.options.require_depth:
            images = self._with_depth(ref, model, dense, images)
        order = chain_order(cm.covisibility(images))
        frames = []
        for position, k in enumerate(order):
            depth = self._depth_path(dense, images[k].name)
            frames.append(colmap_frame(position, images[k], model, dense / "imgs" / images[k].name,
                                       depth if depth.is_file() else None, ref.name))
        return Scene(ref.name, dense, frames)

    @staticmethod
    def _depth_path(dense: Path, name: str) -> Path:
        return (dense / "depths" / name).with_suffix(".h5")

    def _with_depth(self, ref: SceneRef, model: cm.Model, dense: Path,
                    images: list[cm.Image]) -> list[cm.Image]:
        """``images`` that have an h5 depth map; one warning for the others."""
        no_depth = [im.name for im in images if not self._depth_path(dense, im.name).is_file()]
        if no_depth:
            self.warn(f"{dense / 'depths'}: no h5 depth for {len(no_depth)} image(s), "
                      f"skipped: {name_listing(no_depth)} (scene {ref.name})")
        dropped = set(no_depth)
        kept = [im for im in images if im.name not in dropped]
        if not kept:
            raise ValueError(f"{dense / 'depths'}: no h5 depth for any image of "
                             f"{model.paths['images']} (scene {ref.name})")
        return kept

    def read_depth(self, frame: Frame) -> np.ndarray:
        scene = frame.extra["scene"]
        depth = read_h5_depth(frame.depth, scene)
        check_depth_size(frame, depth)
        count = valid_values(depth, MASK_VALUES)
        if count == 0:
            raise SkipFrame(f"{frame.depth}: no valid depth pixel, frame dropped (scene {scene})")
        if count <= MASK_VALUES:
            raise SkipFrame(f"{frame.depth}: a mask (its valid pixels take {count} value(s)), "
                            f"not a depth map, frame dropped (scene {scene})")
        return depth
