"""Fast3R teacher adapter (upstream facebookresearch/fast3r). The ``fast3r`` package is imported
lazily.

Pipeline for one sample of N views (cache resolution ``(H, W)``, Fast3R long side ``S``=512):
1. each source image is cropped to the region the cache image covers (the cache aspect; the
   same cover + centre-crop rule as ``distill3r.data.io.resize_crop``, rounded to whole source
   pixels), then resized with the same rule to ``(Hf, Wf) = fit_size(H, W, S, 16)`` and
   normalised to [-1, 1] (mean = std = 0.5): teacher and student see the same field of view;
2. ``torch.manual_seed`` (seed from ``teacher.seed`` and the sample key) right before the
   forward: it fixes the random image-index embedding Fast3R draws at every forward (the draw
   also adds the torch.distributed rank, so cache building never initialises a process group);
3. ``inference(views, model, device, dtype, verbose=False, profiling=False)``; bf16 passes
   ``torch.bfloat16`` inside an explicit bf16 autocast (some upstream revisions only map
   precision strings and would otherwise fall back to the device's default autocast dtype);
   fp32 passes the string ``"32"``, which disables autocast (``torch.float32`` would not);
4. global target = each view's local points aligned to its global points by a weighted Umeyama
   sim(3) on the view's top-15% global-confidence pixels (weights = confidence); local target =
   the raw local points;
5. every map is resampled to the cache grid through the exact pixel mapping of steps 1 (cache
   pixel -> source -> Fast3R pixel; bilinear, never stretched). When ``(Hf, Wf)`` (multiples of
   16) and ``(H, W)`` (multiples of 14) differ slightly in aspect, the Fast3R image trims at most
   half a 16-px step per side: cache pixels outside its view are masked. The crop box rounding
   (< 1 source pixel) is part of the mapping, so the remaining difference is interpolation only;
6. mask = inside & conf_global > conf_threshold & conf_local > conf_threshold (conf >= 1).

Checks only a real GPU run can make (the conversion below is tested with a stand-in module):
loading the released checkpoint; the output keys/shapes of the installed revision; that bf16 and
fp32 really run in that precision on CUDA; run-to-run determinism of CUDA kernels (seeding fixes
the image indices only); memory and speed at ``views_per_sample``; target quality vs ground truth.
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
from distill3r.data.io import fit_size, read_image
from distill3r.data.sampling import stable_seed
from distill3r.geometry import umeyama
from distill3r.teachers.base import Teacher, TeacherInput, TeacherOutput, params_digest

VERSION = 1
PATCH = 16
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
        return "32"  # upstream inference: a torch.float32 dtype still runs under autocast
    raise ValueError(f"teacher.dtype must be 'bf16' or 'fp32' for fast3r, got {dtype!r}")


# ---------------------------------------------------------------------------------------------
# Pixel geometry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoverCrop:
    """``resize_crop``'s transform from an ``(h, w)`` image to ``(H, W)``: scale to ``(nh, nw)``
    (covering), then crop at ``(x0, y0)``. Pixel centres at integer coordinates."""

    h: int
    w: int
    nh: int
    nw: int
    x0: int
    y0: int

    @classmethod
    def fit(cls, h: int, w: int, H: int, W: int) -> "CoverCrop":
        s = max(H / h, W / w)
        nh, nw = max(H, int(round(h * s))), max(W, int(round(w * s)))
        return cls(h, w, nh, nw, (nw - W) // 2, (nh - H) // 2)

    def to_input(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Output pixel coords -> input pixel coords."""
        return ((u + self.x0 + 0.5) * self.w / self.nw - 0.5,
                (v + self.y0 + 0.5) * self.h / self.nh - 0.5)

    def to_output(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input pixel coords -> output pixel coords."""
        return ((x + 0.5) * self.nw / self.w - 0.5 - self.x0,
                (y + 0.5) * self.nh / self.h - 0.5 - self.y0)


@dataclass(frozen=True)
class ViewGeometry:
    """How one source image became the Fast3R input, and how to come back to the cache grid."""

    cache: CoverCrop  # source (h, w) -> cache (H, W)
    box: tuple[int, int, int, int]  # source crop x0, y0, x1, y1 (cache aspect)
    teacher: CoverCrop  # crop -> Fast3R input (Hf, Wf)

    def cache_to_teacher(self, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[H,W]`` maps of Fast3R pixel coordinates for every cache pixel."""
        v, u = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64),
                           indexing="ij")
        x, y = self.cache.to_input(u, v)
        x, y = self.teacher.to_output(x - self.box[0], y - self.box[1])
        return x.astype(np.float32), y.astype(np.float32)


def _resize(image: np.ndarray, nh: int, nw: int, interp_up: int = cv2.INTER_CUBIC) -> np.ndarray:
    down = nh * nw < image.shape[0] * image.shape[1]
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if down else interp_up)


def preprocess_image(source: np.ndarray, cache_hw: tuple[int, int],
                     long_side: int) -> tuple[np.ndarray, ViewGeometry]:
    """Source RGB uint8 ``[h,w,3]`` -> Fast3R input float32 ``[3,Hf,Wf]`` in [-1,1] + geometry."""
    h, w = source.shape[:2]
    H, W = cache_hw
    cache = CoverCrop.fit(h, w, H, W)
    # the source region the cache image covers, in pixel-edge coordinates, rounded
    x0 = int(round(cache.x0 * w / cache.nw))
    x1 = int(round((cache.x0 + W) * w / cache.nw))
    y0 = int(round(cache.y0 * h / cache.nh))
    y1 = int(round((cache.y0 + H) * h / cache.nh))
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    crop = source[y0:y1, x0:x1]
    Hf, Wf = fit_size(H, W, long_side, PATCH)
    teacher = CoverCrop.fit(y1 - y0, x1 - x0, Hf, Wf)
    resized = _resize(crop, teacher.nh, teacher.nw)
    out = resized[teacher.y0:teacher.y0 + Hf, teacher.x0:teacher.x0 + Wf]
    img = (out.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(img.transpose(2, 0, 1)), ViewGeometry(cache, (x0, y0, x1, y1),
                                                                      teacher)


def make_views(images: list[np.ndarray]) -> list[dict]:
    """Fast3R view dicts (the structure of ``fast3r.dust3r.utils.image.load_images``)."""
    import torch

    views = []
    for i, img in enumerate(images):
        _, Hf, Wf = img.shape
        views.append({"img": torch.from_numpy(img)[None], "true_shape": np.int32([[Hf, Wf]]),
                      "idx": i, "instance": str(i)})
    return views


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


def convert_predictions(pred: dict[str, np.ndarray], geometries: list[ViewGeometry],
                        cache_hw: tuple[int, int], conf_threshold: float,
                        where: str = "fast3r") -> TeacherOutput:
    """Parsed predictions at Fast3R resolution -> :class:`TeacherOutput` at ``cache_hw``."""
    aligned, _ = align_local_to_global(pred["local"], pred["global"], pred["conf"], where=where)
    n, hf, wf = pred["conf"].shape
    H, W = cache_hw
    xyz_g = np.zeros((n, H, W, 3), np.float32)
    xyz_l = np.zeros((n, H, W, 3), np.float32)
    conf_g = np.ones((n, H, W), np.float32)
    conf_l = np.ones((n, H, W), np.float32)
    mask = np.zeros((n, H, W), bool)
    for j, geo in enumerate(geometries):
        mx, my = geo.cache_to_teacher(H, W)
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
    """Switch off ``attn_bias_for_inference_enabled`` everywhere (it must stay off for the
    released weights); returns how many modules had it on."""
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
        inputs, geometries = [], []
        for path in batch.image_paths:
            img, geo = preprocess_image(read_image(path), batch.size, self.params.image_size)
            inputs.append(img)
            geometries.append(geo)
        out = self.run(make_views(inputs), batch.key)
        pred = parse_predictions(out, batch.num_views, where)
        return convert_predictions(pred, geometries, batch.size, self.params.conf_threshold,
                                   where)
