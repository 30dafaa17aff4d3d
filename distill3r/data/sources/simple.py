"""The built-in demo renders and a plain folder of image folders."""

from __future__ import annotations

import json

import numpy as np

from distill3r.data.io import scene_images
from distill3r.data.sources.base import (Frame, Scene, SceneRef, Source, register_source,
                                         subfolders)


@register_source
class DemoSource(Source):
    """The built-in demo renders (``distill3r.data.demo``): ``<root>/<scene>/cameras.json``
    with rgb/depth PNGs, K and OpenCV c2w per frame."""

    kind = "demo"

    def find_scenes(self) -> list[SceneRef]:
        return [SceneRef(folder.name, folder) for folder in subfolders(self)]

    def read_scene(self, ref: SceneRef) -> Scene:
        path = ref.path / "cameras.json"
        if not path.is_file():
            raise ValueError(f"{ref.path}: not a demo scene (no cameras.json), scene {ref.name}")
        try:
            frames = [Frame(frame=int(f["frame"]), image=ref.path / f["image"],
                            depth=(ref.path / f["depth"]) if f.get("depth") else None,
                            K=np.asarray(f["K"], np.float64),
                            c2w=np.asarray(f["c2w"], np.float64))
                      for f in json.loads(path.read_text())["frames"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: malformed cameras file: {exc!r} (scene {ref.name})") from exc
        return Scene(ref.name, ref.path, frames)


@register_source
class ImageFolderSource(Source):
    """A folder of scenes, each a folder of images (no ground truth). Frames are listed by
    :func:`distill3r.data.io.scene_images` (the rule inference uses: natural file-name order,
    images in the folder or its ``rgb/``/``images/`` subfolder); other files are skipped."""

    kind = "images"

    def find_scenes(self) -> list[SceneRef]:
        return [SceneRef(folder.name, folder) for folder in subfolders(self)]

    def read_scene(self, ref: SceneRef) -> Scene:
        images, skipped = scene_images(ref.path)
        for path in skipped:
            self.warn(f"{path}: not an image file, skipped")
        return Scene(ref.name, ref.path, [Frame(frame=i, image=p) for i, p in enumerate(images)])
