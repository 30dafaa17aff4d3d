"""MegaDepth v1, laid out as the D2-Net preprocessing leaves it (most downstream projects).

Layout::

    <root>/
    ├── MegaDepth_v1/                        options.depth_root (the release's
    │   └── <scene_id>/                      phoenix/S6/zl548/MegaDepth_v1 folder, moved or not)
    │       └── dense0/                      options.images_subdir
    │           ├── imgs/<name>.jpg          undistorted photos
    │           └── depths/<stem>.h5         HDF5 dataset "depth", float32 [H,W]
    └── Undistorted_SfM/                     options.sfm_dir (D2-Net's undistort_reconstructions)
        └── <scene_id>/
            └── sparse-txt/                  options.model_subdir; .txt or .bin model
                ├── cameras.txt              PINHOLE cameras
                ├── images.txt               world-to-camera poses; NAME = the imgs file name
                └── points3D.txt

A scene is any ``<scene_id>`` folder under either ``MegaDepth_v1`` or ``Undistorted_SfM``; a
scene lacking its half of the layout is skipped and named. Scene name = ``<scene_id>``.

Files read: the COLMAP model (:mod:`distill3r.data.colmap_model`), ``imgs/<NAME>`` and
``depths/<NAME without suffix>.h5`` for every image of the model found in ``imgs``.

Depth: the h5 dataset ``depth``, z-depth of the MVS reconstruction in the SfM model's units
(no metric scale: each scene is consistent up to its own unknown scale); 0, negative or
non-finite = invalid. It must have the camera's (and image's) size. The source converts it to
``.npy`` (``native_depth`` False); ``h5py`` is imported only then.

Poses and intrinsics: COLMAP world-to-camera ``(qvec w,x,y,z; tvec)`` with OpenCV axes, so
``c2w`` is its inverse; ``K`` from the PINHOLE/SIMPLE_PINHOLE camera with 0.5 subtracted from
the principal point (COLMAP's top-left pixel centre is (0.5, 0.5), the project's (0, 0)). A
distorted camera skips the scene.

Frame order: photo collections have no capture order, so frames follow a covisibility chain
(:func:`distill3r.data.ordering.chain_order` on the number of 3D points two images share,
from the images' POINT3D_IDs), not the file names. ``Frame.frame`` is the chain position.

Skipped with a warning (one per scene): images of the model not in ``imgs`` (the SfM model
also holds photos of other dense folders), photos in ``imgs`` the model lacks, and, with
``require_depth``, images without an h5 depth. Skipped scenes (reason names the file): no
model, a malformed model file, a distorted camera, no ``imgs`` folder, no usable image, an h5
file that is unreadable, lacks the ``depth`` dataset or differs in size from its camera.

Options (defaults): ``images_subdir`` ("dense0"), ``sfm_dir`` ("Undistorted_SfM"),
``model_subdir`` ("sparse-txt"), ``depth_root`` ("MegaDepth_v1"), ``require_depth`` (true:
frames without an h5 depth are dropped; false: kept without depth).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill3r.data import colmap_model as cm
from distill3r.data.io import IMAGE_SUFFIXES
from distill3r.data.ordering import chain_order
from distill3r.data.sources.base import Frame, Scene, SceneRef, Source, register_source, subfolders
from distill3r.data.sources.colmap import (check_depth_size, checked_camera, name_listing,
                                           pinhole_K)

@dataclass
class MegaDepthOptions:
    images_subdir: str = "dense0"
    sfm_dir: str = "Undistorted_SfM"
    model_subdir: str = "sparse-txt"  # text or binary model
    depth_root: str = "MegaDepth_v1"
    require_depth: bool = True  # drop frames without an h5 depth map


def read_h5_depth(path: Path, scene: str) -> np.ndarray:
    """The ``depth`` dataset of a MegaDepth h5 file as float32 (invalid -> 0)."""
    import h5py  # only this source needs it

    try:
        with h5py.File(path, "r") as f:
            if "depth" not in f:
                raise ValueError(f"{path}: no 'depth' dataset in the h5 file (has "
                                 f"{sorted(f.keys())}) (scene {scene})")
            depth = np.asarray(f["depth"][()], np.float32)
    except OSError as exc:
        raise ValueError(f"{path}: unreadable h5 depth file: {exc} (scene {scene})") from exc
    if depth.ndim != 2:
        raise ValueError(f"{path}: depth must be 2-D, got shape {depth.shape} (scene {scene})")
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)


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
        try:
            model = cm.read_model(model_folder)
        except ValueError as exc:
            raise ValueError(f"{exc} (scene {ref.name})") from exc
        images = self._usable_images(ref, model, dense)
        order = chain_order(cm.covisibility(images))
        frames = []
        for position, k in enumerate(order):
            image = images[k]
            camera = checked_camera(model, image, ref.name)
            depth = self._depth_path(dense, image.name)
            frames.append(Frame(frame=position, image=dense / "imgs" / image.name,
                                depth=depth if depth.is_file() else None,
                                K=pinhole_K(model, camera.id, ref.name), c2w=cm.image_c2w(image),
                                size=(camera.height, camera.width),
                                extra={"scene": ref.name, "size": (camera.width, camera.height),
                                       "camera": camera.id,
                                       "cameras_file": str(model.paths["cameras"])}))
        return Scene(ref.name, dense, frames)

    @staticmethod
    def _depth_path(dense: Path, name: str) -> Path:
        return (dense / "depths" / name).with_suffix(".h5")

    def _usable_images(self, ref: SceneRef, model: cm.Model, dense: Path) -> list[cm.Image]:
        """The model's images present in ``imgs`` (and with depth if required), by name."""
        folder = dense / "imgs"
        if not folder.is_dir():
            raise ValueError(f"{folder}: image folder not found (scene {ref.name})")
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
        listed = sorted(model.images.values(), key=lambda im: im.name)
        names = {im.name for im in listed}
        missing = [im.name for im in listed if im.name not in on_disk]
        if missing:
            self.warn(f"{folder}: {len(missing)} image(s) of {model.paths['images']} not here, "
                      f"skipped: {name_listing(missing)} (scene {ref.name})")
        unused = sorted(on_disk - names)
        if unused:
            self.warn(f"{folder}: {len(unused)} image(s) not in {model.paths['images']}, "
                      f"ignored: {name_listing(unused)} (scene {ref.name})")
        present = [im for im in listed if im.name in on_disk]
        if self.options.require_depth:
            no_depth = [im.name for im in present if not self._depth_path(dense, im.name).is_file()]
            if no_depth:
                self.warn(f"{dense / 'depths'}: no h5 depth for {len(no_depth)} image(s), "
                          f"skipped: {name_listing(no_depth)} (scene {ref.name})")
            dropped = set(no_depth)
            present = [im for im in present if im.name not in dropped]
        if not present:
            raise ValueError(f"{folder}: no usable image of {model.paths['images']} (scene "
                             f"{ref.name})")
        return present

    def read_depth(self, frame: Frame) -> np.ndarray:
        depth = read_h5_depth(frame.depth, frame.extra.get("scene", "?"))
        check_depth_size(frame, depth)
        return depth
