"""Scenes reconstructed with COLMAP (a lab's own captures, or any COLMAP project).

Layout (``root`` is a folder of scenes, or itself one scene named after the folder)::

    <root>/
    └── <scene>/
        ├── images/                          options.images_dir
        │   ├── 0001.jpg                     the model's image NAMEs, relative to this folder
        │   └── ...                          (sub-folders such as cam0/0001.jpg are fine)
        ├── sparse/0/                        options.model_dir (falls back to its parent, sparse/)
        │   ├── cameras.bin | cameras.txt    .bin preferred over .txt per file
        │   ├── images.bin  | images.txt
        │   └── points3D.bin | points3D.txt  (optional, never read)
        ├── depths/                          optional, options.depth_dir
        │   ├── 0001.npy                     float metres, or
        │   └── 0001.png                     16-bit, metres = value * options.depth_png_scale
        └── dense/                           optional: `colmap image_undistorter` output
            ├── images/                      options.undistorted_images: dense/images
            └── sparse/                      options.undistorted_model: dense/sparse (PINHOLE)

Files read: the model's cameras and images (:mod:`distill3r.data.colmap_model`; points3D is
not parsed, so a broken or huge points3D file does not matter), the images it lists, and per
image ``<depth_dir>/<NAME without suffix>.npy`` (preferred) or ``.png`` when present.

Depth: z-depth in the units of the model's translations (metres when the model is metric,
e.g. scaled with ``colmap model_aligner``); ``.npy`` float (non-finite, <= 0 = invalid) or a
single-channel 16-bit PNG (0 = invalid) scaled by ``depth_png_scale`` (default 0.001:
millimetres). ``.npy`` maps, and PNGs when that scale is the project's own (1e-4), go into the
manifest as they are (referenced in place); other PNGs are converted to ``.npy`` metres
(``depth_is_native``). A map must have the camera's size (``Frame.size``, else the scene is
skipped).

Poses and intrinsics: COLMAP stores world-to-camera ``(qvec w,x,y,z; tvec)`` with OpenCV camera
axes, so ``c2w`` is its inverse. ``K`` comes from PINHOLE (fx, fy, cx, cy) or SIMPLE_PINHOLE
(f, cx, cy) cameras, with 0.5 subtracted from cx, cy (COLMAP puts the centre of the top-left
pixel at (0.5, 0.5), the project at (0, 0)). Perspective models whose distortion parameters are
all zero (SIMPLE_RADIAL k=0, OPENCV with zeros...) count as pinhole. Any other camera used by an
image skips the scene: undistort it first::

    colmap image_undistorter --image_path <scene>/images --input_path <scene>/sparse/0 \\
        --output_path <scene>/dense --output_type COLMAP

and set ``undistorted_images: dense/images`` and ``undistorted_model: dense/sparse``; depth
maps must then match the undistorted images.

Frame order: the images sorted by NAME (capture order for numbered frames). Images the model
lists but the image folder lacks are skipped with a warning; images on disk the model does not
list are ignored with a warning (both one warning per scene).

Skipped scenes (reason names the file): no model folder, a malformed cameras or images file
(the reason gives the line or byte), an image using a distorted camera, an unknown camera id,
no image of the model on disk, an unreadable depth map (e.g. an 8-bit PNG) or one whose size
differs from its camera's.

The helpers above the source class (model reading, images on disk, one frame per model image,
the depth size check) are shared with :mod:`distill3r.data.sources.megadepth`.

Options (defaults): ``images_dir`` ("images"), ``model_dir`` ("sparse/0"), ``depth_dir``
("depths"), ``depth_png_scale`` (0.001 metres per PNG unit), ``undistorted_images`` and
``undistorted_model`` (unset; both or neither, relative to the scene folder, replacing
``images_dir`` and ``model_dir``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill3r.data import colmap_model as cm
from distill3r.data.io import DEPTH_PNG_SCALE, IMAGE_SUFFIXES, read_depth, read_depth_png
from distill3r.data.sources.base import Frame, Scene, SceneRef, Source, register_source, subfolders

_LISTED = 3  # file names quoted in a warning


@dataclass
class ColmapOptions:
    images_dir: str = "images"
    model_dir: str = "sparse/0"  # falls back to its parent folder when it holds no model
    depth_dir: str = "depths"
    depth_png_scale: float = 0.001  # metres per unit of a 16-bit depth PNG
    undistorted_images: str | None = None  # e.g. "dense/images" (image_undistorter output)
    undistorted_model: str | None = None  # e.g. "dense/sparse"


# ------------------------------------------------ helpers shared with the megadepth source

def name_listing(names: list[str]) -> str:
    """The first few of ``names`` for a warning."""
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def read_scene_model(folder: Path, scene: str) -> cm.Model:
    """Cameras and images of a COLMAP model (points3D is neither parsed nor required: poses
    and ``Image.point3d_ids`` are all the sources use); ``ValueError`` naming file and scene."""
    try:
        return cm.read_model(folder, points=False)
    except ValueError as exc:
        raise ValueError(f"{exc} (scene {scene})") from exc


def images_on_disk(source: Source, model: cm.Model, folder: Path, scene: str) -> list[cm.Image]:
    """The model's images found in ``folder``, sorted by name; one warning for the images the
    model lists but ``folder`` lacks and one for the images ``folder`` has but the model does
    not list. ``ValueError`` if none is there."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: image folder not found (scene {scene})")
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    listed = sorted(model.images.values(), key=lambda im: im.name)
    missing = [im.name for im in listed if im.name not in on_disk]
    if missing:
        source.warn(f"{folder}: {len(missing)} image(s) of {model.paths['images']} not found, "
                    f"skipped: {name_listing(missing)} (scene {scene})")
    unused = sorted(on_disk - {im.name for im in listed})
    if unused:
        source.warn(f"{folder}: {len(unused)} image(s) not in {model.paths['images']}, "
                    f"ignored: {name_listing(unused)} (scene {scene})")
    present = [im for im in listed if im.name in on_disk]
    if not present:
        raise ValueError(f"{model.paths['images']}: none of its {len(listed)} images is in "
                         f"{folder} (scene {scene})")
    return present


def colmap_frame(index: int, image: cm.Image, model: cm.Model, image_path: Path,
                 depth: Path | None, scene: str, hint: str = "") -> Frame:
    """The frame of one model image: ``K`` of its pinhole camera, ``c2w`` the inverse of its
    world-to-camera pose, ``size`` the camera's (H, W). ``ValueError`` naming the file and
    scene (followed by ``hint``) for an unknown or distorted camera."""
    cameras_file = model.paths["cameras"]
    camera = model.cameras.get(image.camera_id)
    if camera is None:
        raise ValueError(f"{model.paths['images']}: image {image.name} uses camera "
                         f"{image.camera_id}, which {cameras_file} lacks (scene {scene})")
    try:
        K = cm.camera_K(camera)
    except ValueError as exc:
        raise ValueError(f"{cameras_file}: {exc} (scene {scene}){hint}") from exc
    return Frame(frame=index, image=image_path, depth=depth, K=K, c2w=cm.image_c2w(image),
                 size=(camera.height, camera.width),
                 extra={"scene": scene, "camera": camera.id, "cameras_file": str(cameras_file)})


def check_depth_size(frame: Frame, depth: np.ndarray) -> None:
    """``ValueError`` if ``depth`` differs in size from the frame's camera (``Frame.size``):
    then ``K`` would not describe it."""
    height, width = frame.size
    if depth.shape != (height, width):
        raise ValueError(f"{frame.depth}: depth is {depth.shape[1]}x{depth.shape[0]} but "
                         f"camera {frame.extra['camera']} of {frame.extra['cameras_file']} is "
                         f"{width}x{height} (scene {frame.extra['scene']})")


# ------------------------------------------------ the source

@register_source
class ColmapSource(Source):
    """COLMAP projects; see the module docstring for the layout."""

    kind = "colmap"
    Options = ColmapOptions

    def __init__(self, root: str | Path, name: str | None = None,
                 options: ColmapOptions | None = None):
        super().__init__(root, name, options)
        o = self.options
        if (o.undistorted_images is None) != (o.undistorted_model is None):
            raise ValueError(f"{self.root}: options undistorted_images and undistorted_model of "
                             f"source kind {self.kind!r} must be set together")
        if not o.depth_png_scale > 0:
            raise ValueError(f"{self.root}: option depth_png_scale={o.depth_png_scale!r} must "
                             "be > 0")
        # PNGs in another unit than the project's are converted by the manifest builder
        self.native_depth = o.depth_png_scale == DEPTH_PNG_SCALE

    @property
    def _images_rel(self) -> str:
        return self.options.undistorted_images or self.options.images_dir

    @property
    def _model_rel(self) -> str:
        return self.options.undistorted_model or self.options.model_dir

    def _model_folder(self, scene: Path) -> Path | None:
        folder = scene / self._model_rel
        if cm.has_model(folder):
            return folder
        parent = folder.parent
        if parent != scene and scene in parent.parents and cm.has_model(parent):
            return parent
        return None

    def _is_scene(self, folder: Path) -> bool:
        model = folder / self._model_rel
        return (folder / self._images_rel).is_dir() and (model.is_dir() or model.parent.is_dir()
                                                         and model.parent != folder)

    def find_scenes(self) -> list[SceneRef]:
        if self._is_scene(self.root):
            return [SceneRef(self.root.resolve().name, self.root)]
        return [SceneRef(folder.name, folder) for folder in subfolders(self)]

    def read_scene(self, ref: SceneRef) -> Scene:
        folder = self._model_folder(ref.path)
        if folder is None:
            raise ValueError(f"{ref.path / self._model_rel}: COLMAP model folder not found (no "
                             f"cameras and images .bin/.txt there) (scene {ref.name})")
        model = read_scene_model(folder, ref.name)
        self._warn_other_models(ref, folder)
        images_dir = ref.path / self._images_rel
        images = images_on_disk(self, model, images_dir, ref.name)
        hint = ("" if self.options.undistorted_model else
                f"; run `colmap image_undistorter --image_path {images_dir} --input_path "
                f"{folder} --output_path {ref.path / 'dense'}` and set the options "
                "undistorted_images: dense/images, undistorted_model: dense/sparse")
        frames = [colmap_frame(i, image, model, images_dir / image.name,
                               self._depth_path(ref.path, image.name), ref.name, hint)
                  for i, image in enumerate(images)]
        without = [f.image.name for f in frames if f.depth is None]
        if (ref.path / self.options.depth_dir).is_dir() and without:
            self.warn(f"{ref.path / self.options.depth_dir}: no depth map for {len(without)} "
                      f"image(s) ({name_listing(without)}) (scene {ref.name})")
        return Scene(ref.name, ref.path, frames)

    def _warn_other_models(self, ref: SceneRef, folder: Path) -> None:
        if not folder.name.isdigit():
            return
        others = sorted(p.name for p in folder.parent.iterdir()
                        if p.is_dir() and p.name.isdigit() and p != folder)
        if others:
            self.warn(f"{folder.parent}: only model {folder.name} is used, not {others} "
                      f"(scene {ref.name})")

    def _depth_path(self, scene: Path, name: str) -> Path | None:
        stem = (scene / self.options.depth_dir / name).with_suffix("")
        for suffix in (".npy", ".png"):
            path = stem.with_name(stem.name + suffix)
            if path.is_file():
                return path
        return None

    def depth_is_native(self, frame: Frame) -> bool:
        return frame.depth is not None and (frame.depth.suffix == ".npy" or self.native_depth)

    def read_depth(self, frame: Frame) -> np.ndarray:
        """``.npy`` metres as ``io.read_depth`` reads them (the builder references them in
        place), or a 16-bit PNG times ``depth_png_scale``; checked against the camera size."""
        scene = frame.extra["scene"]
        if frame.depth.suffix == ".png":
            depth = read_depth_png(frame.depth, self.options.depth_png_scale, f"scene {scene}")
        else:
            try:
                depth = read_depth(frame.depth)
            except ValueError as exc:
                raise ValueError(f"{exc} (scene {scene})") from exc
        check_depth_size(frame, depth)
        return depth
