"""Fast3R teacher adapter (upstream facebookresearch/fast3r). The ``fast3r`` package is imported
lazily.

Pipeline for one sample of N views (cache resolution ``(H, W)``, Fast3R long side ``S`` =
``teacher.image_size``, 512 for the released weights):

1. Input. Upstream's ``load_images(size=512)`` never gives a square image and Fast3R was trained
   on landscape 512 x {384, 336, 288, 256, 160}, so every view is handed over landscape, width
   ``S``, with a height whose aspect lies in that range (:func:`choose_teacher_crop`): the crop
   of the source that covers the cache view (the region :class:`ViewTransform.cover` keeps),
   preferring the training sizes and then the tightest crop; where no such crop can cover the
   cache view (a square cache of a square source), the one covering most of it. A portrait
   cache view is handled as upstream's datasets handle portrait images: the source is
   transposed to landscape and ``true_shape`` is the portrait ``(height, width)`` when the
   model's patch embedding is ``ManyAR_PatchEmbed`` (which transposes it back); with a plain
   patch embedding the network sees the transposed image as it is, ``true_shape`` is the
   tensor's shape and the points' x/y are swapped back (:func:`to_input_layout`). All views of
   a sample share one input size. Pixels are normalised to [-1, 1] (mean = std = 0.5).
2. ``torch.manual_seed`` (seed from ``teacher.seed`` and the sample key) right before the
   forward: it fixes the random image-index embedding Fast3R draws at every forward (the draw
   also adds the torch.distributed rank, so cache building never initialises a process group).
3. ``inference(views, model, device, dtype, verbose=False, profiling=False)``. Precision: bf16
   passes ``torch.bfloat16`` inside an explicit bf16 autocast; fp32 passes the string ``"32"``,
   which disables Fast3R's own autocast (``torch.float32`` would not). Even then upstream's
   attention (croco ``models/blocks.py``) wraps itself in ``torch.autocast("cuda",
   dtype=torch.bfloat16)`` unconditionally, so on a GPU attention runs in bf16 whatever
   ``teacher.dtype`` says; only the rest of the network is fp32 with ``fp32``.
4. Global target = each view's local points aligned to its global points by a weighted Umeyama
   sim(3) on the view's top-15% global-confidence pixels (weights = confidence); local target =
   the raw local points.
5. Every map is resampled to the cache grid through the exact pixel mapping (cache pixel ->
   source -> teacher input pixel, bilinear). Cache pixels outside the teacher's view are
   masked, never extrapolated.
6. mask = inside & conf_global > conf_threshold & conf_local > conf_threshold (conf >= 1).

Checks only a real GPU run can make (the conversion below is tested with stand-in modules of
both patch-embedding kinds): loading the released checkpoint; the output keys/shapes of the
installed revision; run-to-run determinism of CUDA kernels (seeding fixes the image indices
only); memory and speed at ``views_per_sample``; target quality against ground truth.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from distill3r.config import TeacherParams, to_dict
from distill3r.data.io import read_image
from distill3r.data.view import ViewTransform
from distill3r.data.sampling import stable_seed
from distill3r.geometry import umeyama
from distill3r.teachers.base import Teacher, TeacherInput, TeacherOutput, params_digest

VERSION = 2
PATCH = 16
# Fast3R's training input heights at width 512 (facebookresearch/fast3r
# configs/experiment/super_long_training: 512x384, 512x336, 512x288, 512x256, 512x160)
TRAIN_HEIGHTS_512 = (384, 336, 288, 256, 160)
TOP_FRACTION = 0.15
PRED_KEYS = ("pts3d_in_other_view", "conf", "pts3d_local", "conf_local")
INSTALL_HINT = ("teacher 'fast3r' needs the Fast3R package, which is not on PyPI: on a GPU "
                "machine clone facebookresearch/fast3r and `pip install -e` it into this "
                "environment (see external/README.md)")


def fast3r_precision(dtype: str) -> Any:
    """``teacher.dtype`` -> the ``dtype`` argument of Fast3R's ``inference``."""
    import torch

    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return "32"  # torch.float32 would still run under Fast3R's autocast
    raise ValueError(f"teacher.dtype must be 'bf16' or 'fp32' for fast3r, got {dtype!r}")


# ---------------------------------------------------------------------------------------------
# Pixel geometry
# ---------------------------------------------------------------------------------------------
def _teacher_heights(long_side: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(training heights, other allowed heights)`` of a landscape Fast3R input whose width is
    ``long_side``: multiples of 16 with an aspect inside the training range."""
    train = tuple(dict.fromkeys(max(PATCH, int(round(long_side * t / 512 / PATCH)) * PATCH)
                                for t in TRAIN_HEIGHTS_512))
    lo, hi = long_side * min(TRAIN_HEIGHTS_512) / 512, long_side * max(TRAIN_HEIGHTS_512) / 512
    others = tuple(t for t in range(PATCH, long_side, PATCH)
                   if lo - 1e-9 <= t <= hi + 1e-9 and t not in train)
    return train, others


def _crop_for(height: int, long_side: int, src_hw: tuple[int, int],
              box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    """The smallest crop of aspect ``long_side / height`` around ``box`` (centred, moved
    inside the source), shrunk to fit the source where it cannot cover the box:
    ``(x0, y0, width, height)`` in source pixels (continuous)."""
    h, w = src_hw
    bx0, by0, bx1, by1 = box
    aspect = long_side / height
    cw = max(bx1 - bx0, aspect * (by1 - by0))
    ch = cw / aspect
    fit = min(1.0, w / cw, h / ch)
    cw, ch = cw * fit, ch * fit
    x0 = min(max((bx0 + bx1) / 2 - cw / 2, 0.0), w - cw)
    y0 = min(max((by0 + by1) / 2 - ch / 2, 0.0), h - ch)
    return x0, y0, cw, ch


def choose_teacher_crop(src_hw: tuple[int, int], box: tuple[int, int, int, int],
                        long_side: int, heights: tuple[int, ...] | None = None
                        ) -> tuple[int, tuple[int, int, int, int]]:
    """Pick the landscape teacher input for a (landscape) cache ``box`` of a source.

    Preference: the largest share of the box covered; then one of Fast3R's training sizes;
    then the tightest crop (most teacher pixels on the cache view). ``heights`` restricts the
    candidate input heights (all views of a sample share one input size). Returns ``(height,
    (x0, y0, x1, y1))``, the crop in whole source pixels (rounded outwards, inside the source).
    """
    h, w = src_hw
    bx0, by0, bx1, by1 = box
    train, others = _teacher_heights(long_side)
    best, best_key = None, None
    for height in heights or train + others:
        x0, y0, cw, ch = _crop_for(height, long_side, src_hw, box)
        overlap = (max(0.0, min(x0 + cw, bx1) - max(x0, bx0))
                   * max(0.0, min(y0 + ch, by1) - max(y0, by0)))
        coverage = round(overlap / ((bx1 - bx0) * (by1 - by0)), 6)
        key = (coverage, height in train, -cw * ch, height)
        if best_key is None or key > best_key:
            best, best_key = (height, (x0, y0, cw, ch)), key
    height, (x0, y0, cw, ch) = best
    crop = (max(0, math.floor(x0 + 1e-6)), max(0, math.floor(y0 + 1e-6)),
            min(w, math.ceil(x0 + cw - 1e-6)), min(h, math.ceil(y0 + ch - 1e-6)))
    return height, crop


@dataclass(frozen=True)
class TeacherView:
    """How one source image became the Fast3R input, and the way back to the cache grid.

    ``transposed``: the cache view is portrait, so the teacher input is the transposed source
    (landscape); ``teacher`` is then a transform of the transposed source."""

    cache: ViewTransform  # source -> cache (H, W)
    teacher: ViewTransform  # (transposed) source -> Fast3R input (Ht, long side), landscape
    transposed: bool

    @property
    def true_shape(self) -> tuple[int, int]:
        """The view's own ``(height, width)`` as upstream datasets set ``true_shape``: portrait
        for a transposed view, the input tensor is its landscape transpose."""
        ht, wt = self.teacher.out_hw
        return (wt, ht) if self.transposed else (ht, wt)

    def cache_to_teacher(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[H,W]`` maps of Fast3R input-tensor pixel coordinates per cache pixel."""
        return self.cache.pixel_map_to(self.teacher, transpose=self.transposed)


def plan_view(src_hw: tuple[int, int], cache_hw: tuple[int, int], long_side: int,
              heights: tuple[int, ...] | None = None,
              transposed: bool | None = None) -> TeacherView:
    """The teacher input of a source of size ``src_hw`` for a cache view of ``cache_hw``.
    ``transposed`` defaults to a portrait cache view, or a square one of a portrait source
    (whose landscape transpose a landscape crop can cover)."""
    cache = ViewTransform.cover(src_hw, cache_hw)
    if transposed is None:
        transposed = cache_hw[0] > cache_hw[1] or (
            cache_hw[0] == cache_hw[1] and src_hw[0] > src_hw[1])
    if transposed and cache_hw[0] < cache_hw[1]:
        raise ValueError(f"a landscape cache view ({cache_hw[0]}x{cache_hw[1]}) is never "
                         "transposed")
    x0, y0, x1, y1 = cache.box
    src, box = (src_hw[::-1], (y0, x0, y1, x1)) if transposed else (src_hw, cache.box)
    height, crop = choose_teacher_crop(tuple(src), box, long_side, heights)
    return TeacherView(cache, ViewTransform(tuple(src), crop, (height, long_side)), transposed)


def plan_views(src_sizes: list[tuple[int, int]], cache_hw: tuple[int, int],
               long_side: int) -> list[TeacherView]:
    """One :class:`TeacherView` per view, all with the same orientation and input size: what
    most views choose on their own (ties: the earliest view's)."""
    def most_common(values: list) -> Any:
        return max(values, key=lambda x: (values.count(x), -values.index(x)))

    transposed = most_common([plan_view(hw, cache_hw, long_side).transposed for hw in src_sizes])
    alone = [plan_view(hw, cache_hw, long_side, transposed=transposed) for hw in src_sizes]
    common = most_common([v.teacher.out_hw[0] for v in alone])
    return [v if v.teacher.out_hw[0] == common
            else plan_view(hw, cache_hw, long_side, (common,), transposed)
            for v, hw in zip(alone, src_sizes)]


def preprocess_image(source: np.ndarray, view: TeacherView) -> np.ndarray:
    """Source RGB uint8 ``[h,w,3]`` -> Fast3R input float32 ``[3,Ht,long_side]`` in [-1,1]
    (always landscape: a portrait view is transposed)."""
    src = source.transpose(1, 0, 2) if view.transposed else source
    out = view.teacher.image(src, upsample=cv2.INTER_CUBIC)
    img = (out.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def make_views(images: list[np.ndarray], true_shapes: list[tuple[int, int]]) -> list[dict]:
    """Fast3R view dicts (the structure of ``fast3r.dust3r.utils.image.load_images``)."""
    import torch

    return [{"img": torch.from_numpy(img)[None], "true_shape": np.int32([shape]),
             "idx": i, "instance": str(i)}
            for i, (img, shape) in enumerate(zip(images, true_shapes))]


def uses_many_ar_patch_embed(model: Any) -> bool:
    """Whether the model's patch embedding is upstream's ``ManyAR_PatchEmbed`` (which turns a
    transposed input with a portrait ``true_shape`` back to portrait itself)."""
    modules = model.modules() if hasattr(model, "modules") else []
    return any(type(m).__name__ == "ManyAR_PatchEmbed" for m in modules)


# ---------------------------------------------------------------------------------------------
# Output conversion
# ---------------------------------------------------------------------------------------------
def parse_predictions(out: dict, num_views: int, where: str = "fast3r") -> dict[str, np.ndarray]:
    """``inference`` output -> float32 numpy ``{"global","conf","local","conf_local"}``, each
    ``[N,h,w,(3)]`` (batch size 1)."""
    preds = out.get("preds") if isinstance(out, dict) else None
    if not isinstance(preds, (list, tuple)) or len(preds) != num_views:
        raise ValueError(f"{where}: expected out['preds'] as a list of {num_views} dicts")
    arrays: dict[str, list] = {k: [] for k in PRED_KEYS}
    for i, pred in enumerate(preds):
        for k in PRED_KEYS:
            if k not in pred:
                raise ValueError(f"{where}: view {i} prediction has no {k!r}")
            a = pred[k].detach().float().cpu().numpy()
            want = 4 if k.startswith("pts3d") else 3
            if a.ndim != want or a.shape[0] != 1 or (want == 4 and a.shape[-1] != 3):
                raise ValueError(f"{where}: view {i} {k} has shape {list(a.shape)}, expected "
                                 f"(1,H,W{',3' if want == 4 else ''})")
            arrays[k].append(a[0])
    out_np = {name: np.stack(arrays[k]).astype(np.float32) for name, k in
              zip(("global", "conf", "local", "conf_local"), PRED_KEYS)}
    shapes = {v.shape[:3] for v in out_np.values()}
    if len(shapes) != 1:
        raise ValueError(f"{where}: prediction maps disagree in size: {sorted(shapes)}")
    return out_np


def align_local_to_global(local: np.ndarray, glob: np.ndarray, conf: np.ndarray,
                          top_fraction: float = TOP_FRACTION, where: str = "fast3r"):
    """Per view, fit ``glob ~ s R local + t`` (weighted Umeyama, weights = ``conf``) on the
    top ``top_fraction`` confident finite pixels and apply it to all local points.

    Returns ``(aligned [N,h,w,3] float32, [(s, R, t), ...])``."""
    aligned = np.zeros_like(local, dtype=np.float32)
    sims = []
    for j in range(local.shape[0]):
        src, dst, c = local[j].reshape(-1, 3), glob[j].reshape(-1, 3), conf[j].reshape(-1)
        ok = np.flatnonzero(np.isfinite(src).all(1) & np.isfinite(dst).all(1) & np.isfinite(c))
        k = max(3, int(math.ceil(top_fraction * ok.size)))
        if ok.size < 3:
            raise ValueError(f"{where}: view {j} has fewer than 3 finite points to align")
        top = ok[np.argpartition(-c[ok], min(k, ok.size) - 1)[:k]]
        s, R, t = umeyama(src[top], dst[top], weights=c[top])
        aligned[j] = (s * local[j].astype(np.float64) @ R.T + t).astype(np.float32)
        sims.append((s, R, t))
    return aligned, sims


def resample_to_cache(array: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """Bilinear sample ``array [h,w(,C)]`` at Fast3R pixel coords ``map_x/map_y [H,W]``."""
    return cv2.remap(np.ascontiguousarray(array, np.float32), map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def to_input_layout(pred: dict[str, np.ndarray], views: list[TeacherView], many_ar: bool,
                    where: str = "fast3r") -> dict[str, np.ndarray]:
    """Parsed predictions -> the input tensor's (landscape) layout, points in each view's own
    (untransposed) camera axes.

    Upstream's heads return maps in the landscape layout of the input tensor
    (``transpose_to_landscape`` in dust3r's ``utils/misc.py``); a map in the portrait layout
    of ``true_shape`` is transposed to it. With ``ManyAR_PatchEmbed`` the network sees a
    transposed view as the portrait image it is, so its points are in the real camera axes;
    with a plain patch embedding it sees the transposed image, whose camera has x and y
    swapped: the point coordinates x and y are swapped back (all views of a sample share one
    orientation, so view 0's frame, the global frame, is swapped consistently)."""
    ht, wt = views[0].teacher.out_hw
    transposed = views[0].transposed
    hw = pred["conf"].shape[1:3]
    if hw == (wt, ht) and (ht, wt) != (wt, ht):
        pred = {k: np.ascontiguousarray(np.swapaxes(v, 1, 2)) for k, v in pred.items()}
    elif hw != (ht, wt):
        raise ValueError(f"{where}: prediction maps are {hw[0]}x{hw[1]} but the input was "
                         f"{ht}x{wt}")
    if transposed and not many_ar:
        pred = dict(pred, **{k: np.ascontiguousarray(pred[k][..., [1, 0, 2]])
                             for k in ("global", "local")})
    return pred


def convert_predictions(pred: dict[str, np.ndarray], views: list[TeacherView],
                        cache_hw: tuple[int, int], conf_threshold: float,
                        where: str = "fast3r") -> TeacherOutput:
    """Predictions in the input layout (:func:`to_input_layout`) -> :class:`TeacherOutput`
    at ``cache_hw``. Cache pixels outside the teacher's view are masked (zero points,
    confidence 1), never extrapolated."""
    aligned, _ = align_local_to_global(pred["local"], pred["global"], pred["conf"], where=where)
    n, hf, wf = pred["conf"].shape
    H, W = cache_hw
    xyz_g = np.zeros((n, H, W, 3), np.float32)
    xyz_l = np.zeros((n, H, W, 3), np.float32)
    conf_g = np.ones((n, H, W), np.float32)
    conf_l = np.ones((n, H, W), np.float32)
    mask = np.zeros((n, H, W), bool)
    for j, view in enumerate(views):
        mx, my = view.cache_to_teacher()
        inside = (mx >= -0.5) & (mx <= wf - 0.5) & (my >= -0.5) & (my <= hf - 0.5)
        g = resample_to_cache(aligned[j], mx, my)
        lo = resample_to_cache(pred["local"][j], mx, my)
        cg = np.maximum(resample_to_cache(pred["conf"][j], mx, my), 1.0)
        cl = np.maximum(resample_to_cache(pred["conf_local"][j], mx, my), 1.0)
        ok = inside & np.isfinite(g).all(-1) & np.isfinite(lo).all(-1) & np.isfinite(cg) \
            & np.isfinite(cl)
        xyz_g[j][ok], xyz_l[j][ok] = g[ok], lo[ok]
        conf_g[j][ok], conf_l[j][ok] = cg[ok], cl[ok]
        mask[j] = ok & (cg > conf_threshold) & (cl > conf_threshold)
    return TeacherOutput(xyz_global=xyz_g, xyz_local=xyz_l, conf_global=conf_g,
                         conf_local=conf_l, mask=mask)


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------
def load_fast3r(checkpoint: str, device) -> tuple[Any, Callable]:
    """Import Fast3R, load ``checkpoint`` (HF id or local folder); returns (model, inference)."""
    try:
        from fast3r.dust3r.inference_multiview import inference
        from fast3r.models.fast3r import Fast3R
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    model = Fast3R.from_pretrained(checkpoint).to(device).eval()
    disable_attn_bias(model)
    return model, inference


def disable_attn_bias(model) -> int:
    """Switch off ``attn_bias_for_inference_enabled`` everywhere (must stay off for the released
    weights); returns how many modules had it on."""
    changed = 0
    for module in model.modules():
        if getattr(module, "attn_bias_for_inference_enabled", False):
            module.attn_bias_for_inference_enabled = False
            changed += 1
    return changed


def weights_identity(checkpoint: str) -> str:
    """Local folder: sha256 of its files; Hugging Face id: the resolved snapshot commit."""
    path = Path(checkpoint)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(chunk)
        return f"dir:{digest.hexdigest()[:16]}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} (huggingface_hub missing: {exc})") from exc
    return f"hf:{checkpoint}@{Path(snapshot_download(checkpoint)).name}"


class Fast3RTeacher(Teacher):
    """Fast3R through its own package. ``model``/``inference_fn`` may be injected (tests use a
    stand-in module with Fast3R's output structure); otherwise they load on first use."""

    name = "fast3r"

    def __init__(self, params: TeacherParams, model: Any = None,
                 inference_fn: Callable | None = None, weights_id: str | None = None):
        self.params = params
        self.precision = fast3r_precision(params.dtype)
        if params.image_size % PATCH or params.image_size < PATCH:
            raise ValueError(f"teacher.image_size must be a multiple of {PATCH}, "
                             f"got {params.image_size}")
        self._model, self._inference = model, inference_fn
        self._weights_id = weights_id or (f"injected:{type(model).__name__}" if model else None)
        self._device = None

    def _relevant(self) -> dict:
        p = self.params
        return {"weights": self._weights(), "dtype": p.dtype, "image_size": p.image_size,
                "conf_threshold": p.conf_threshold, "seed": p.seed, "top_fraction": TOP_FRACTION}

    def _weights(self) -> str:
        if self._weights_id is None:
            self._weights_id = weights_identity(self.params.checkpoint)
        return self._weights_id

    def fingerprint(self) -> str:
        return f"{self.name}-v{VERSION}-{params_digest(self._relevant())}"

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint(), "version": VERSION,
                "weights": self._weights(), "params": to_dict(self.params)}

    def _ensure_loaded(self):
        from distill3r.devices import resolve_device

        if self._device is None:
            self._device = resolve_device(self.params.device)
        if self._model is None:
            self._model, self._inference = load_fast3r(self.params.checkpoint, self._device)
        if self._inference is None:
            raise ValueError("Fast3RTeacher: a model was injected without an inference_fn")

    def run(self, views: list[dict], key: str) -> dict:
        """Seeded forward of ``views``; returns Fast3R's raw output dict."""
        import torch

        self._ensure_loaded()
        torch.manual_seed(stable_seed(self.params.seed, key))
        bf16 = self.precision is torch.bfloat16
        ctx = torch.autocast(self._device.type, dtype=torch.bfloat16) if bf16 \
            else contextlib.nullcontext()
        with ctx, torch.no_grad():
            return self._inference(views, self._model, self._device, self.precision,
                                   verbose=False, profiling=False)

    def predict(self, batch: TeacherInput) -> TeacherOutput:
        where = f"fast3r teacher, sample {batch.key!r}"
        if len(batch.image_paths) != batch.num_views:
            raise ValueError(f"{where}: needs the source image path of every view")
        sources = [read_image(path) for path in batch.image_paths]
        views = plan_views([img.shape[:2] for img in sources], batch.size,
                           self.params.image_size)
        inputs = [preprocess_image(img, view) for img, view in zip(sources, views)]
        self._ensure_loaded()
        many_ar = uses_many_ar_patch_embed(self._model)
        shapes = [v.true_shape if many_ar else v.teacher.out_hw for v in views]
        out = self.run(make_views(inputs, shapes), batch.key)
        pred = to_input_layout(parse_predictions(out, batch.num_views, where), views, many_ar,
                               where)
        return convert_predictions(pred, views, batch.size, self.params.conf_threshold, where)
