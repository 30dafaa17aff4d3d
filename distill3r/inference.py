"""Reconstruct scenes from folders of images with a trained student.

``run_inference(images_dir, checkpoint, output_dir, params)`` finds the scenes, loads the
student (``distill3r.models.load_student``) and writes per scene, into ``output_dir``:

- ``<scene>_student.ply``: global points (view 0's camera frame, OpenCV axes, the model's
  scale) whose local confidence is at or above the ``conf_percentile`` percentile, coloured
  from the input images, with each point's local ``confidence`` and source ``view``;
- ``<scene>_cameras.json``: estimated ``K`` (shared, at the processed resolution) and ``c2w``
  per image from :func:`distill3r.evaluation.poses.estimate_cameras` (the recipe evaluation
  scores: focal from view 0's confident points, view 0 the identity, PnP-RANSAC for the
  others, Procrustes where PnP fails), in the layout of the demo scenes' ``cameras.json``;
- ``<scene>_info.json``: views, resolution, timings, points kept, checkpoint fingerprint;
- ``<scene>_preview.png``: a render of the cloud plus per-view depth and confidence.

Scene discovery: ``images_dir`` holding images is one scene named after the folder; a folder
with an ``rgb/`` or ``images/`` subfolder of images likewise; otherwise every subfolder that is
a scene is processed. Views are listed by :func:`distill3r.data.io.scene_images` (natural
file-name order), the rule of ``kind: images`` sources too, so view 0 is the same image. All
views of a scene are resized and centre-cropped (never stretched) to one size: long side
``size``, multiples of the model's patch size, the orientation of most images (ties: the first
image's).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill3r.colmap_export import ExportView, write_colmap
from distill3r.config import InferParams, MergeParams
from distill3r.data.io import (IMAGE_SUBFOLDERS, IMAGE_SUFFIXES, is_image_file, natural_key,
                               read_image, scene_images)
from distill3r.data.view import ViewChain, ViewTransform, fit_size, shrink_transform, view_chain
from distill3r.devices import autocast, resolve_device, resolve_dtype
from distill3r.evaluation.poses import estimate_cameras
from distill3r.export import ply_writer, preview_views, write_preview
from distill3r.inputs import images_to_input
from distill3r.jsonio import write_json
from distill3r.mapstore import MapStore, StoredArray, StreamedPercentile
from distill3r.models.checkpoint import checkpoint_fingerprint

log = logging.getLogger(__name__)


@dataclass
class Scene:
    """One scene to reconstruct: its name and image files (sorted; the first is view 0)."""

    name: str
    images: list[Path]


def _warn_skipped(paths: list[Path]) -> None:
    for p in paths:
        log.warning("%s: not an image (suffix not in %s), skipped", p, ", ".join(IMAGE_SUFFIXES))


def find_scenes(images_dir: str | Path) -> list[Scene]:
    """The scenes under ``images_dir`` (see the module docstring); ``ValueError`` if none."""
    root = Path(images_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: images folder not found")
    images, skipped = scene_images(root)
    _warn_skipped(skipped)
    if images:
        subdirs = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and p.name not in IMAGE_SUBFOLDERS]
        if subdirs and any(is_image_file(p) for p in root.iterdir()):
            log.warning("%s: holds images, so it is one scene; subfolders ignored: %s", root,
                        ", ".join(sorted(subdirs)))
        return [Scene(root.resolve().name, images)]
    scenes = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=natural_key):
        found, skipped = scene_images(sub)
        _warn_skipped(skipped)
        if found:
            scenes.append(Scene(sub.name, found))
        else:
            log.warning("%s: no images, skipped", sub)
    if not scenes:
        raise ValueError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files "
                         f"in the folder, in {'/ or '.join(IMAGE_SUBFOLDERS)}/, and in scene "
                         "subfolders)")
    return scenes


def _target_size(sizes: list[tuple[int, int]], size: int, multiple: int) -> tuple[int, int]:
    """The common ``(H, W)``: the orientation of most images (ties: the first image's)."""
    portrait = [h > w for h, w in sizes]
    n_portrait = sum(portrait)
    if 2 * n_portrait == len(sizes):
        want_portrait = portrait[0]
    else:
        want_portrait = 2 * n_portrait > len(sizes)
    ref = next(i for i, p in enumerate(portrait) if p == want_portrait)
    H, W = fit_size(*sizes[ref], size, multiple)
    if 0 < n_portrait < len(sizes):
        log.warning("mixed portrait and landscape images: all are centre-cropped to %dx%d (HxW)",
                    H, W)
    return H, W


def load_views(paths: list[Path], size: int, multiple: int) -> tuple[np.ndarray, list]:
    """Read, resize and centre-crop images to one common size.

    Returns:
        ``(images [N,H,W,3] uint8, original sizes [(h, w), ...])``. ``ValueError`` naming the
        file for an unreadable image.
    """
    if not paths:
        raise ValueError("no images to load")
    raw, sizes = [], []
    for p in paths:
        img = read_image(p)
        sizes.append(img.shape[:2])
        shrink = shrink_transform(img.shape[:2], size + multiple)  # bound the memory held
        raw.append(img if shrink is None else shrink.image(img))
    hw = _target_size(sizes, size, multiple)
    return np.stack([ViewTransform.cover(img.shape[:2], hw).image(img) for img in raw]), sizes


def store_views(paths: list[Path], size: int, multiple: int, store: MapStore
                ) -> tuple[StoredArray, list[ViewChain]]:
    """:func:`load_views` into ``store`` (map ``images``) one image at a time: every image is
    read twice (sizes first, then the crop), none is held beyond its own turn. Returns the
    stored images and, per image, the :func:`view_chain` from the source to the input."""
    if not paths:
        raise ValueError("no images to load")
    sizes = [read_image(p).shape[:2] for p in paths]
    H, W = _target_size(sizes, size, multiple)
    chains = [view_chain(s, size + multiple, (H, W)) for s in sizes]
    store.create("images", (len(paths), H, W, 3), np.uint8)
    for p, chain in zip(paths, chains):
        store.append("images", chain.image(read_image(p))[None])
    return store["images"], chains


def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device,
            dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Run the student on ``images [N,H,W,3]`` uint8 -> numpy float32 maps without batch
    axis: ``xyz_global, xyz_local [N,H,W,3]``, ``conf_global, conf_local [N,H,W]``."""
    x = images_to_input(torch.from_numpy(images).to(device))[None]
    with torch.inference_mode(), autocast(device, dtype):
        out = model(x)
    return {k: out[k][0].float().cpu().numpy() for k in
            ("xyz_global", "xyz_local", "conf_global", "conf_local")}


class PointCap:
    """A uniformly random subset of exactly ``min(total, max_points)`` of ``total`` items
    met view by view (deterministic for ``seed``): ``take(count)`` -> sorted indices of the
    items kept among the next ``count``. Per view, the number kept is a hypergeometric draw
    given what remains, then the items are a random subset of that size, so nothing of size
    ``total`` is ever held."""

    def __init__(self, total: int, max_points: int | None, seed: int) -> None:
        self.rest = int(total)
        self.want = self.rest if max_points is None else min(self.rest, int(max_points))
        self.rng = np.random.default_rng(seed)

    def take(self, count: int) -> np.ndarray:
        if count > self.rest:
            raise ValueError(f"PointCap: {count} items offered, only {self.rest} announced")
        if self.want == self.rest:
            m = count
        elif count == 0 or self.want == 0:
            m = 0
        else:
            m = int(self.rng.hypergeometric(count, self.rest - count, self.want))
        self.rest -= count
        self.want -= m
        if m == count:
            return np.arange(count)
        return np.sort(self.rng.choice(count, size=m, replace=False))


def select_points(xyz_global: np.ndarray, keep: np.ndarray, images: np.ndarray,
                  max_points: int | None = None, seed: int = 0):
    """The points of the ``keep`` pixels (see
    :func:`distill3r.evaluation.poses.confident_pixels`), coloured.

    Args:
        xyz_global: ``[N,H,W,3]``; keep: ``[N,H,W]`` bool; images: ``[N,H,W,3]`` uint8.
        max_points: cap on the result (the :class:`PointCap` subset for ``seed``, the one
            streamed inference takes).
    Returns:
        ``(points [M,3] float32, colors [M,3] uint8, exported [N,H,W] bool)``.
    """
    cap = PointCap(int(keep.sum()), max_points, seed)
    exported = np.zeros(keep.shape, bool)
    for i in range(len(keep)):
        idx = np.flatnonzero(keep[i])
        exported[i].reshape(-1)[idx[cap.take(len(idx))]] = True
    return (xyz_global[exported].astype(np.float32), images[exported], exported)


MAPS = {"xyz_global": (3, np.float16), "xyz_local": (3, np.float16),
        "conf_global": (0, np.float32), "conf_local": (0, np.float32)}


class KeptPixels:
    """The ``keep [N,H,W]`` mask of :func:`distill3r.evaluation.poses.confident_pixels` for
    stored maps, computed one view at a time: finite global point, finite local confidence at
    or above ``threshold``."""

    def __init__(self, store: MapStore, threshold: float) -> None:
        self.xyz, self.conf, self.threshold = store["xyz_global"], store["conf_local"], threshold
        self.shape = self.conf.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        conf = self.conf[i]
        return np.isfinite(self.xyz[i]).all(-1) & np.isfinite(conf) & (conf >= self.threshold)


def _forward_to_store(model, images: StoredArray, store: MapStore, params: InferParams,
                      device: torch.device, dtype: torch.dtype) -> StreamedPercentile:
    """Stream the model over ``images`` into the maps of ``store`` (:data:`MAPS`); returns the
    first pass of the local-confidence percentile over pixels with finite stored points."""
    n, H, W = images.shape[:3]
    for name, (channels, kind) in MAPS.items():
        store.create(name, (n, H, W) + ((channels,) if channels else ()), kind)
    pct = StreamedPercentile()

    def sink(start: int, maps: dict[str, np.ndarray]) -> None:
        for name in MAPS:
            store.append(name, maps[name])
        xyz = store_dtype_view(maps["xyz_global"])
        conf = maps["conf_local"]
        pct.add(conf[np.isfinite(xyz).all(-1) & np.isfinite(conf)])

    model.forward_stream(images, device, dtype, sink, params.view_chunk, params.token_chunk)
    store.close()
    return pct


def store_dtype_view(xyz: np.ndarray) -> np.ndarray:
    """Points as the store keeps them (float16, ``inf`` beyond its range)."""
    with np.errstate(over="ignore"):
        return xyz.astype(np.float16)


def _threshold(store: MapStore, pct: StreamedPercentile, percentile: float) -> float:
    """Second pass of the exact percentile over the stored maps."""
    pct.plan(percentile)
    xyz, conf = store["xyz_global"], store["conf_local"]
    for i in range(len(conf)):
        c = conf[i]
        pct.refine(c[np.isfinite(xyz[i]).all(-1) & np.isfinite(c)])
    return pct.result()


# per point of the PLY: its local confidence (what the viewer's slider filters on) and view
PLY_EXTRA = (("confidence", "float"), ("view", "int"))


def kept_points(store: MapStore, keep: KeptPixels, count: int, params: InferParams):
    """``points(i)`` for views ``i = 0, 1, ...`` in turn: the exported (kept, capped by
    :class:`PointCap`) pixels of view i as ``(flat pixel indices [m], global points [m,3]
    float32, colours [m,3] uint8)``; every call of this function yields the same subset."""
    cap = PointCap(count, params.max_points, params.seed)

    def points(i: int):
        idx = np.flatnonzero(keep[i])
        idx = idx[cap.take(len(idx))]
        return (idx, store["xyz_global"][i].reshape(-1, 3)[idx].astype(np.float32),
                store["images"][i].reshape(-1, 3)[idx])
    return points, cap.want


def _export_points(path: Path, store: MapStore, keep: KeptPixels, count: int,
                   params: InferParams, render_points: int = 100_000):
    """Write the kept (capped) points of every view to the PLY at ``path``, one view at a
    time; returns ``(points written, every k-th point and colour for the preview render)``."""
    points_of, total = kept_points(store, keep, count, params)
    step = max(1, -(-total // render_points))
    sample_p, sample_c, written = [], [], 0
    with ply_writer(path, total, colors=True, extra=PLY_EXTRA) as ply:
        for i in range(len(keep)):
            idx, points, colors = points_of(i)
            ply.write(points, colors, confidence=store["conf_local"][i].reshape(-1)[idx],
                      view=np.full(len(idx), i, np.int32))
            first = (-written) % step
            sample_p.append(points[first::step])
            sample_c.append(colors[first::step])
            written += len(points)
    return written, np.concatenate(sample_p), np.concatenate(sample_c)


def reconstruct_scene(model: torch.nn.Module, scene: Scene, output_dir: str | Path,
                      params: InferParams, device: torch.device,
                      checkpoint: str | Path | None = None) -> dict:
    """Reconstruct one scene, streamed (:mod:`distill3r.models.streaming`, maps in a float16
    :class:`~distill3r.mapstore.MapStore` under ``params.scratch_dir``, removed at the end),
    and write its four outputs; returns the info dict."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"distill3r-{scene.name}-",
                                     dir=params.scratch_dir) as scratch:
        store = MapStore(scratch)
        try:
            return _reconstruct(model, scene, out, params, device, checkpoint, store)
        finally:
            store.remove()


def _reconstruct(model, scene: Scene, out: Path, params: InferParams, device: torch.device,
                 checkpoint, store: MapStore) -> dict:
    t0 = time.perf_counter()
    patch = int(getattr(model, "patch_size", 14))
    images, chains = store_views(scene.images, params.size, patch, store)
    t1 = time.perf_counter()
    dtype = resolve_dtype(params.dtype, device)
    pct = _forward_to_store(model, images, store, params, device, dtype)
    t2 = time.perf_counter()
    if not 0 <= params.conf_percentile <= 100:
        raise ValueError(f"conf_percentile must be in [0, 100], got {params.conf_percentile}")
    if pct.total == 0:
        raise ValueError(f"{scene.name}: the model predicted no finite points")
    threshold = _threshold(store, pct, params.conf_percentile)
    keep = KeptPixels(store, threshold)
    count = sum(int(keep[i].sum()) for i in range(len(keep)))
    files = {k: out / f"{scene.name}_{k}" for k in
             ("student.ply", "cameras.json", "info.json", "preview.png")}
    kept, render_p, render_c = _export_points(files["student.ply"], store, keep,
                                              count, params)
    t3 = time.perf_counter()
    cams = estimate_cameras(store, keep, params.pnp_reprojection_px, params.seed)
    K, c2w, methods = cams.K, cams.c2w, cams.methods
    N, H, W = keep.shape
    cameras = {"scene": scene.name, "width": W, "height": H,
               "note": "K at the processed resolution; c2w in view 0's camera frame, model scale",
               "frames": [{"frame": i, "image": p.name, "source_size": list(chains[i].src_hw),
                           "K": K.tolist(), "c2w": c2w[i].tolist(), "pose_method": methods[i]}
                          for i, p in enumerate(scene.images)]}
    write_json(files["cameras.json"], cameras)
    colmap = None
    if params.colmap:
        files["colmap"] = out / f"{scene.name}_colmap"
        views = [ExportView(p, c) for p, c in zip(scene.images, chains)]
        colmap = write_colmap(files["colmap"], views, K, c2w,
                              kept_points(store, keep, count, params)[0])
    shown = preview_views(N, params.preview_views)
    write_preview(files["preview.png"], np.stack([images[i] for i in shown]),
                  np.stack([store["xyz_local"][i][..., 2] for i in shown]).astype(np.float32),
                  np.stack([store["conf_local"][i] for i in shown]).astype(np.float32),
                  render_p, render_c, K, max_render_points=max(1, len(render_p)),
                  view_ids=shown)
    t4 = time.perf_counter()
    config = getattr(model, "config", None)
    info = {
        "scene": scene.name, "views": N, "resolution": [H, W],
        "images": [str(p) for p in scene.images],
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_fingerprint": checkpoint and checkpoint_fingerprint(checkpoint),
        "model": getattr(config, "name", None), "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "token_merge": _merge_info(model),
        "conf_percentile": params.conf_percentile, "conf_threshold": threshold,
        "points_total": int(N * H * W), "points_kept": int(kept),
        "focal_px": float(K[0, 0]), "pose_methods": methods,
        "timings_s": {"load": t1 - t0, "forward": t2 - t1, "points": t3 - t2,
                      "poses_and_preview": t4 - t3, "total": t4 - t0},
        "colmap": colmap,
        "outputs": {k: str(v) for k, v in files.items()},
    }
    write_json(files["info.json"], info)
    return info


def set_token_merge(model: torch.nn.Module, merge: MergeParams | None) -> None:
    """Switch the student's decoder token merging (``distill3r.models.merge``) on as
    ``merge`` says, or off for ``None`` / ``enabled: false``."""
    from distill3r.models.merge import TokenMerge  # lazy: the model code is only needed here

    on = merge is not None and merge.enabled
    model.decoder.merge = TokenMerge(merge.ratio, merge.keep_views) if on else None


def _merge_info(model) -> dict | None:
    merge = getattr(getattr(model, "decoder", None), "merge", None)
    return None if merge is None else {"ratio": merge.ratio, "keep_views": merge.keep_views}


def run_inference(images_dir: str | Path, checkpoint: str | Path, output_dir: str | Path,
                  params: InferParams | None = None,
                  failures: list[tuple[str, str]] | None = None,
                  merge: MergeParams | None = None) -> list[dict]:
    """Find the scenes, load the student from ``checkpoint`` and reconstruct every scene
    (with decoder token merging where ``merge.enabled``).

    With a ``failures`` list, a scene whose input is bad (``ValueError``) is appended to it as
    ``(scene, message)`` and the other scenes still run; without one the error propagates."""
    params = params or InferParams()
    scenes = find_scenes(images_dir)  # fail on bad input before loading the model
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise ValueError(f"{ckpt}: checkpoint folder not found (expected model.safetensors "
                         "and config.json written by training)")
    from distill3r.models import load_student  # lazy: the model code is only needed here

    device = resolve_device(params.device)
    try:
        model = load_student(ckpt, device=device)
    except ValueError as exc:
        raise ValueError(f"cannot load the student from {ckpt}: {exc}") from exc
    set_token_merge(model, merge)
    infos = []
    for scene in scenes:
        log.info("%s: %d image(s)", scene.name, len(scene.images))
        try:
            infos.append(reconstruct_scene(model, scene, output_dir, params, device, ckpt))
        except ValueError as exc:
            if failures is None:
                raise
            log.error("%s: %s", scene.name, exc)
            failures.append((scene.name, str(exc)))
    return infos
