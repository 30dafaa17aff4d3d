"""Typed parameters: one dataclass per section of ``params.yaml``.

``load_params(path)`` returns a :class:`Params` whose sections are dataclasses, and validates
all of it before returning: unknown keys, missing required keys, wrongly typed values, a value
outside a field's choices (``Literal[...]``: the message lists them) and values out of range all
raise ``ValueError`` naming the file and the dotted key. Every stage loads the whole file, so a
typo anywhere (``dvc exp run -S loss.weighting=teachr``) stops the first stage that runs, before
it does any work. Each section's value checks live in its ``validate()``; code that builds a
section by hand calls the same method.

The dataclass defaults are the values of the shipped ``params.yaml`` (the CPU demo profile);
``params-paper.yaml`` is the published GPU setup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from distill3r.strict import (check_choices, check_device, flatten, from_dict, require,
                              to_dict)

__all__ = ["BenchParams", "CacheParams", "DataParams", "DatasetSampling", "DemoParams",
           "EvalParams", "InferParams", "LossParams", "MergeParams", "ModelParams", "Params",
           "RuntimeParams", "SourceParams", "TeacherParams", "TrainParams", "flatten",
           "from_dict", "load_params", "to_dict"]

# distill3r.models.configs.MODEL_CONFIGS
ModelName = Literal["paper", "tiny", "tiny-lite", "tiny-fine", "tiny-pose", "tiny-conv",
                    "tiny-skip", "tiny-hybrid", "tiny-pyramid", "tiny-pyramid-local",
                    "tiny-pyramid-full", "tiny-pyramid-gn", "tiny-deep", "tiny-fine-pyramid",
                    "micro", "fast3r-large"]
SamplingMode = Literal["random", "stride", "nearby"]
CacheCompression = Literal["deflate", "stored", "auto"]
TeacherName = Literal["groundtruth", "fast3r", "checkpoint"]
ComputeDtype = Literal["bf16", "fp16", "fp32"]


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class DemoParams:
    """The built-in demo dataset: pybullet renders of closed textured rooms with objects."""

    num_scenes: int = 384
    views_per_scene: int = 12
    height: int = 224
    width: int = 224
    seed: int = 0
    workers: int = 2  # parallel render processes (0 or 1: in-process)
    objects_min: int = 3
    objects_max: int = 6
    min_object_distance: float = 0.5  # metres; cameras closer to an object are rejected
    orbit_degrees: float = 120.0  # the partial orbit the cameras of one scene span

    def validate(self, where: str = "demo") -> None:
        require([("num_scenes", self.num_scenes >= 1, "must be >= 1"),
                  ("views_per_scene", self.views_per_scene >= 1, "must be >= 1"),
                  ("height", self.height >= 8, "must be >= 8 pixels"),
                  ("width", self.width >= 8, "must be >= 8 pixels"),
                  ("workers", self.workers >= 0, "must be >= 0"),
                  ("objects_min", self.objects_min >= 0, "must be >= 0"),
                  ("objects_max", self.objects_max >= self.objects_min, "must be >= objects_min"),
                  ("min_object_distance", self.min_object_distance >= 0, "must be >= 0"),
                  ("orbit_degrees", 0 <= self.orbit_degrees <= 360, "must be in [0, 360]")],
                 self, where)


@dataclass
class SourceParams:
    """One source dataset of the manifest (``kind`` selects the reader class; kinds are a
    registry that code can extend, so the manifest stage checks the name)."""

    kind: str = "demo"
    root: str = "data/raw/demo"
    name: Optional[str] = None  # dataset name in the manifest (defaults to kind)
    sample_frac: float = 1.0  # fraction of scenes kept (stable, by hash)
    options: dict[str, Any] = field(default_factory=dict)  # the kind's own options (README)

    def validate(self, where: str = "data.sources[0]") -> None:
        require([("kind", bool(self.kind), "must name a source kind"),
                  ("sample_frac", 0.0 < self.sample_frac <= 1.0, "must be in (0, 1]")],
                 self, where)


@dataclass
class DataParams:
    """The manifest: which sources, the split and the image size on disk."""

    sources: list[SourceParams] = field(default_factory=lambda: [SourceParams()])
    val_fraction: float = 0.15
    resize_max: int = 960  # longest image edge after preprocessing (aspect kept)
    min_frames: int = 2  # scenes with fewer frames are reported and skipped
    split_salt: str = "distill3r"  # the stable scene hash that decides train/val

    def validate(self, where: str = "data") -> None:
        require([("val_fraction", 0.0 <= self.val_fraction <= 1.0, "must be in [0, 1]"),
                  ("resize_max", self.resize_max >= 1, "must be >= 1"),
                  ("min_frames", self.min_frames >= 1, "must be >= 1"),
                  ("sources", bool(self.sources), "at least one source is needed")], self, where)
        for i, source in enumerate(self.sources):
            source.validate(f"{where}.sources[{i}]")


@dataclass
class DatasetSampling:
    """``cache.dataset_sampling`` entry: the view sampling of one manifest dataset; a null field
    keeps the cache-wide value."""

    dataset: str  # the manifest's dataset name
    sampling: Optional[SamplingMode] = None
    frame_stride: Optional[int] = None
    neighbours: Optional[int] = None
    max_samples_per_scene: Optional[int] = None


@dataclass
class CacheParams:
    """Teacher cache: view sampling and WebDataset shards."""

    image_size: list[int] = field(default_factory=lambda: [112, 112])  # [H, W], multiples of 14
    views_per_sample: int = 4
    max_samples_per_scene: int = 4
    sampling: SamplingMode = "stride"  # stride (consecutive), random subsets, nearby (overlap)
    frame_stride: int = 1
    neighbours: int = 8  # nearby: views come from an anchor's nearest frames (>= views - 1)
    dataset_sampling: list[DatasetSampling] = field(default_factory=list)  # per-dataset
    seed: int = 0
    shard_max_samples: int = 64
    shard_max_bytes: int = 256_000_000
    conf_max: float = 60000.0  # confidences are clamped to [1, conf_max] (float16-finite)
    # npz entries: deflate (all), stored (none), auto (deflated where that halves the entry)
    compression: CacheCompression = "auto"

    def validate(self, where: str = "cache") -> None:
        check_choices(self, where)
        size_ok = len(self.image_size) == 2 and min(self.image_size) >= 1
        require([("image_size", size_ok, "must be [H, W] with H, W >= 1"),
                  ("views_per_sample", self.views_per_sample >= 1, "must be >= 1"),
                  ("max_samples_per_scene", self.max_samples_per_scene >= 1, "must be >= 1"),
                  ("frame_stride", self.frame_stride >= 1, "must be >= 1"),
                  ("shard_max_samples", self.shard_max_samples >= 1, "must be >= 1"),
                  ("shard_max_bytes", self.shard_max_bytes >= 1, "must be >= 1"),
                  ("conf_max", 1.0 < self.conf_max <= 65504.0,
                   "must be in (1, 65504] (finite in float16)")], self, where)
        if self.sampling == "nearby":
            self._check_neighbours(self.neighbours, f"{where}.neighbours")
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.dataset_sampling):
            self._check_override(entry, f"{where}.dataset_sampling[{i}]", seen, i)

    def _check_neighbours(self, neighbours: int, key: str, note: str = "") -> None:
        if neighbours < self.views_per_sample - 1:
            raise ValueError(f"{key}: must be >= views_per_sample - 1 = "
                             f"{self.views_per_sample - 1} for nearby sampling{note}, "
                             f"got {neighbours}")

    def _check_override(self, entry: DatasetSampling, where: str, seen: dict[str, int],
                        i: int) -> None:
        check_choices(entry, where)
        if not entry.dataset:
            raise ValueError(f"{where}.dataset: must name a dataset, got {entry.dataset!r}")
        if entry.dataset in seen:
            raise ValueError(f"{where}.dataset: {entry.dataset!r} already has an override "
                             f"(cache.dataset_sampling[{seen[entry.dataset]}])")
        seen[entry.dataset] = i
        for key in ("frame_stride", "max_samples_per_scene"):
            value = getattr(entry, key)
            if value is not None and value < 1:
                raise ValueError(f"{where}.{key}: must be >= 1, got {value}")
        if (entry.sampling or self.sampling) == "nearby":
            if entry.neighbours is not None:
                self._check_neighbours(entry.neighbours, f"{where}.neighbours")
            else:
                self._check_neighbours(self.neighbours, "cache.neighbours",
                                       f" (inherited by {where})")


@dataclass
class TeacherParams:
    """Which teacher fills the cache and how it runs."""

    name: TeacherName = "groundtruth"
    checkpoint: str = "jedyang97/Fast3R_ViT_Large_512"  # HF id or local folder (fast3r)
    device: str = "auto"
    dtype: Literal["bf16", "fp32"] = "bf16"  # fast3r
    image_size: int = 512  # fast3r input long side
    conf_threshold: float = 1.5  # mask = conf > threshold (confidence is always >= 1)
    seed: int = 0
    edge_threshold: float = 0.05  # groundtruth: relative depth jump that marks an edge
    edge_confidence: float = 2.0  # groundtruth: confidence at depth edges
    max_confidence: float = 20.0  # groundtruth: confidence of clean pixels

    def validate(self, where: str = "teacher") -> None:
        check_choices(self, where)
        check_device(self.device, f"{where}.device")
        require([("image_size", self.image_size >= 16 and self.image_size % 16 == 0,
                   "must be a positive multiple of 16"),
                  ("edge_threshold", self.edge_threshold > 0, "must be > 0"),
                  ("edge_confidence", self.edge_confidence >= 1, "must be >= 1"),
                  ("max_confidence", self.max_confidence >= 1, "must be >= 1")], self, where)


@dataclass
class MergeParams:
    """Training-free token merging in the fusion decoder's global attention, at inference only
    (``distill3r.models.merge``): per block, ``ratio`` of the tokens of views
    ``keep_views..N-1`` are merged into their most similar destination token before attention
    and get its output back after; the first ``keep_views`` views (view 0 at least) are never
    merged. Off by default."""

    enabled: bool = False
    ratio: float = 0.5  # in [0, 0.75] (every 4th token of a merged view is a destination)
    keep_views: int = 1

    def validate(self, where: str = "model.merge") -> None:
        require([("ratio", 0.0 <= self.ratio <= 0.75, "must be in [0, 0.75]"),
                  ("keep_views", self.keep_views >= 1, "must be >= 1 (view 0 is always kept)")],
                self, where)


@dataclass
class ModelParams:
    """The student: a named configuration plus run-time options."""

    name: ModelName = "tiny-pyramid-local"
    encoder_weights: Optional[str] = None  # DUNE checkpoint path, or null for random init
    head_chunk_size: int = 8  # views per DPT-head call without autograd (bounds memory)
    merge: MergeParams = field(default_factory=MergeParams)  # inference only

    def validate(self, where: str = "model") -> None:
        check_choices(self, where)
        require([("head_chunk_size", self.head_chunk_size >= 1, "must be >= 1")], self, where)
        self.merge.validate(f"{where}.merge")


@dataclass
class LossParams:
    """Confidence-aware distillation loss: ``alpha_global * L_global + alpha_local * L_local +
    gamma_conf * L_conf + alpha_camera * L_camera + alpha_normal * L_normal``; per-pixel
    weights from the teacher's confidence (``weighting``)."""

    alpha_global: float = 2.0
    alpha_local: float = 1.0
    gamma_conf: float = 0.001
    weighting: Literal["teacher", "none", "student"] = "teacher"
    # per-pixel point error: "euclidean" ||p - q|| (DUSt3R/Fast3R's L21), "squared" ||p - q||^2,
    # or "relative": ||p - q|| over the pixel's normalised distance to its own camera
    distance: Literal["euclidean", "squared", "relative"] = "euclidean"
    conf_scale: float = 10.0
    w_min: float = 0.1
    # weight of the camera-centre term: where each view's two maps place its camera in the
    # global frame, against the teacher's (distill3r.losses, L_camera)
    alpha_camera: float = 0.0
    # weight of the surface-normal term: 1 - cos between the student's and the teacher's
    # local-map normals (distill3r.losses, L_normal)
    alpha_normal: float = 0.0

    def validate(self, where: str = "loss") -> None:
        check_choices(self, where)
        require([("alpha_global", self.alpha_global >= 0, "must be >= 0"),
                  ("alpha_local", self.alpha_local >= 0, "must be >= 0"),
                  ("gamma_conf", self.gamma_conf >= 0, "must be >= 0"),
                  ("alpha_camera", self.alpha_camera >= 0, "must be >= 0"),
                  ("alpha_normal", self.alpha_normal >= 0, "must be >= 0"),
                  ("conf_scale", self.conf_scale > 0, "must be > 0"),
                  ("w_min", 0.0 <= self.w_min <= 1.0, "must be in [0, 1]")], self, where)


# strategies whose ranks hold parameter shards, not whole weights and gradients
SHARDED_STRATEGIES = ("fsdp", "deepspeed")


@dataclass
class TrainParams:
    """Lightning training."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: Union[int, str] = "auto"  # a count, "auto", or Lightning's "0,1" device list
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp",
                      "deepspeed"] = "auto"
    num_nodes: int = 1
    precision: Literal["bf16-mixed", "bf16-true", "16-mixed", "16-true", "32-true",
                       "64-true"] = "bf16-mixed"
    batch_size: int = 2
    accumulate_grad_batches: int = 1
    max_steps: int = 3100
    # muon: Muon for the hidden layers' weight matrices and conv kernels, AdamW for the rest,
    # sharing lr, weight_decay and the schedule; adamw: AdamW for every parameter
    optimizer: Literal["adamw", "muon"] = "muon"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon step
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr: float = 2e-5
    grad_clip: float = 1.0
    # exponential moving average of the weights, updated every optimiser step after the warmup;
    # validation and the saved student use it (0: off; e.g. 0.999 averages ~1000 steps)
    ema_decay: float = 0.0
    seed: int = 0
    num_workers: int = 0
    views: Optional[int] = None  # views per training sample (random subset); null: all cached
    shuffle_view0: bool = False
    color_jitter: float = 0.1
    val_every_steps: int = 1600
    checkpoint_every_steps: int = 400
    log_every_steps: int = 10
    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "distill3r"
    system_metrics: bool = True
    # the student's name in MLflow's model registry (a new version per training); null: none
    registered_model: Optional[str] = "distill3r-student"

    def validate(self, where: str = "train") -> None:
        check_choices(self, where)
        positive = ("batch_size", "accumulate_grad_batches", "max_steps", "val_every_steps",
                    "checkpoint_every_steps", "log_every_steps", "num_nodes")
        require([(k, getattr(self, k) >= 1, "must be >= 1") for k in positive]
                 + [(k, getattr(self, k) >= 0, "must be >= 0")
                    for k in ("warmup_steps", "grad_clip", "color_jitter", "num_workers",
                              "weight_decay")]
                 + [("lr", self.lr > 0, "must be > 0"),
                    ("min_lr", 0 <= self.min_lr <= self.lr, "must be in [0, lr]"),
                    ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                     "must be two numbers in [0, 1)"),
                    ("views", self.views is None or self.views >= 1, "must be >= 1 or null"),
                    ("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1) (0: off)"),
                    ("ema_decay", not (self.ema_decay and self.strategy in SHARDED_STRATEGIES),
                     f"weight averaging needs whole weights on every rank, not strategy "
                     f"{self.strategy!r}: set it to 0"),
                    ("muon_momentum", 0 <= self.muon_momentum < 1, "must be in [0, 1)"),
                    ("muon_ns_steps", 1 <= self.muon_ns_steps < 100, "must be in [1, 99]"),
                    ("optimizer", not (self.optimizer == "muon"
                                       and self.strategy in SHARDED_STRATEGIES),
                     f"Muon orthogonalises whole weight matrices, which strategy "
                     f"{self.strategy!r} splits between ranks: use adamw or ddp")],
                 self, where)
        devices_ok = (self.devices >= 1 or self.devices == -1 if isinstance(self.devices, int)
                      else re.fullmatch(r"auto|-1|\d+(,\d+)*,?", self.devices) is not None)
        require([("devices", devices_ok, "must be a count >= 1, -1, 'auto' or a list like "
                   "'0,1'")], self, where)


@dataclass
class EvalParams:
    """Evaluation of the student on the validation shards."""

    device: str = "auto"
    batch_size: int = 1
    max_samples: Optional[int] = None
    conf_top_fraction: float = 0.15  # pixels used for the sim(3) alignment
    pnp_reprojection_px: float = 5.0
    conf_percentile: float = 10.0  # pixels the poses come from (as infer.conf_percentile)
    seed: int = 0
    max_points: int = 20000  # points per sample for the KD-tree metrics (deterministic subset)
    dtype: ComputeDtype = "bf16"  # autocast dtype where the device supports it (fp32: off)
    layout_prior_max_samples: Optional[int] = None  # train samples fitting the layout prior
    workers: Optional[int] = None  # processes scoring samples; null: the cores, 1: in-process

    def validate(self, where: str = "eval") -> None:
        check_choices(self, where)
        check_device(self.device, f"{where}.device")
        require([("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("max_samples", self.max_samples is None or self.max_samples >= 1,
                   "must be >= 1 or null"),
                  ("conf_top_fraction", 0 < self.conf_top_fraction <= 1, "must be in (0, 1]"),
                  ("pnp_reprojection_px", self.pnp_reprojection_px > 0, "must be > 0"),
                  ("conf_percentile", 0 <= self.conf_percentile <= 100, "must be in [0, 100]"),
                  ("max_points", self.max_points >= 1, "must be >= 1"),
                  ("layout_prior_max_samples", self.layout_prior_max_samples is None
                   or self.layout_prior_max_samples >= 1, "must be >= 1 or null"),
                  ("workers", self.workers is None or self.workers >= 1,
                   "must be >= 1 or null")], self, where)


@dataclass
class InferParams:
    """Inference on a folder of images."""

    size: int = 112  # long side in pixels (rounded to the patch size)
    conf_percentile: float = 10.0  # keep points whose local confidence is at/above it
    device: str = "auto"
    max_points: int = 2_000_000  # cap on exported points (deterministic subset)
    dtype: ComputeDtype = "bf16"  # autocast dtype where the device supports it (fp32: off)
    pnp_reprojection_px: float = 5.0  # camera estimation (PnP-RANSAC inlier threshold)
    preview_views: int = 6  # views shown in the preview PNG
    seed: int = 0
    view_chunk: int = 8  # views per encoder / DPT-head chunk (streamed inference)
    token_chunk: int = 8192  # decoder tokens per chunk outside attention's keys and values
    scratch_dir: Optional[str] = None  # per-view float16 map store; null: the system temp
    colmap: bool = False  # also write <scene>_colmap/ (COLMAP sparse model + images)

    def validate(self, where: str = "infer") -> None:
        check_choices(self, where)
        check_device(self.device, f"{where}.device")
        require([("size", self.size >= 1, "must be >= 1"),
                  ("conf_percentile", 0 <= self.conf_percentile <= 100, "must be in [0, 100]"),
                  ("max_points", self.max_points >= 1, "must be >= 1"),
                  ("pnp_reprojection_px", self.pnp_reprojection_px > 0, "must be > 0"),
                  ("preview_views", self.preview_views >= 0, "must be >= 0"),
                  ("view_chunk", self.view_chunk >= 1, "must be >= 1"),
                  ("token_chunk", self.token_chunk >= 1, "must be >= 1")], self, where)


@dataclass
class BenchParams:
    """Efficiency benchmark: time and memory versus number of views."""

    # cpu: models/views/sizes below; paper: the published table's shapes (+ 256-1000 views for
    # students; GPU); many_views: the whole infer path at 32..1024 views of 112x112
    profile: Literal["cpu", "paper", "many_views"] = "cpu"
    models: list[ModelName] = field(default_factory=lambda: ["paper", "fast3r-large"])
    views: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    image_size: list[int] = field(default_factory=lambda: [224, 224])  # [H, W]
    model_image_sizes: Optional[list[list[int]]] = None  # one [H, W] per model (overrides)
    reference: ModelName = "fast3r-large"  # speed-up, compute and memory ratios against it
    dtype: ComputeDtype = "bf16"  # autocast dtype; weights are also built directly in it
    repeats: int = 3
    warmup: int = 1
    device: str = "auto"
    threads: int = 1  # CPU threads per row (0: every core this process may use)
    head_chunk_size: int = 2  # views per DPT-head chunk, the same for every model
    channels_last: bool = True  # conv weights (and so DPT activations) in channels-last layout
    seed: int = 0

    def validate(self, where: str = "bench") -> None:
        check_choices(self, where)
        check_device(self.device, f"{where}.device")
        sizes = [self.image_size] + list(self.model_image_sizes or [])
        require([("models", bool(self.models), "must list at least one model"),
                  ("views", bool(self.views) and min(self.views) >= 1,
                   "must list view counts >= 1"),
                  ("image_size", all(len(s) == 2 and min(s) >= 1 for s in sizes),
                   "sizes must be [H, W] with H, W >= 1"),
                  ("model_image_sizes", self.model_image_sizes is None
                   or len(self.model_image_sizes) == len(self.models),
                   f"needs one [H, W] per model ({len(self.models)}) or null"),
                  ("repeats", self.repeats >= 1, "must be >= 1"),
                  ("head_chunk_size", self.head_chunk_size >= 1, "must be >= 1"),
                  ("warmup", self.warmup >= 0, "must be >= 0"),
                  ("threads", self.threads >= 0, "must be >= 0")], self, where)


@dataclass
class RuntimeParams:
    """How every stage uses the CPU (see :mod:`distill3r.runtime`)."""

    threads: Optional[int] = None  # torch threads per process; null: the cores
    adapt_to_load: bool = False  # null threads: minus the busy cores (not bit-reproducible)
    # auto: idle OpenMP threads sleep (PASSIVE) only when other programs keep a core busy
    omp_wait_policy: Literal["auto", "passive", "active"] = "auto"

    def validate(self, where: str = "runtime") -> None:
        check_choices(self, where)
        require([("threads", self.threads is None or self.threads >= 1,
                   "must be >= 1 or null")], self, where)


@dataclass
class BenchmarkSpec:
    """``benchmark.benchmarks`` entry: one public benchmark; a null field takes the
    benchmark's protocol default (``distill3r.benchmarks.protocols``)."""

    name: Literal["demo", "sevenscenes", "nrgbd", "dtu", "co3d"]
    root: Optional[str] = None  # the benchmark's folder; null or absent: skipped
    views: Optional[int] = None  # views per sample (window / random selection)
    samples: Optional[int] = None  # total samples over all scenes (null: protocol default)
    selection: Optional[Literal["window", "keyframes", "random"]] = None
    kf_every: Optional[int] = None  # keyframes: every k-th frame
    max_gap: Optional[int] = None  # window: largest index step between selected frames
    split: Optional[Literal["val", "train"]] = None  # demo: scenes of the data split; null: all

    def validate(self, where: str = "benchmark.benchmarks[0]") -> None:
        check_choices(self, where)
        require([(key, getattr(self, key) is None or getattr(self, key) >= 1,
                  "must be >= 1 or null") for key in ("views", "samples", "kf_every", "max_gap")],
                self, where)


@dataclass
class BenchmarkParams:
    """Scoring models on public benchmarks with Fast3R's protocols (stage ``benchmark``)."""

    benchmarks: list[BenchmarkSpec] = field(default_factory=lambda: [
        BenchmarkSpec("demo", "data/raw/demo", views=4, split="val"),
        *(BenchmarkSpec(name) for name in ("sevenscenes", "nrgbd", "dtu", "co3d"))])
    models: list[Literal["student", "fast3r", "groundtruth", "plane"]] = field(
        default_factory=lambda: ["student", "groundtruth", "plane"])
    long_side: int = 112  # evaluation grid long side (sides multiples of the student's patch)
    max_scenes: Optional[int] = None  # scenes per benchmark (a quick run); null: all
    device: str = "auto"
    dtype: ComputeDtype = "bf16"  # the student's autocast dtype where supported
    seed: int = 0

    def validate(self, where: str = "benchmark") -> None:
        check_choices(self, where)
        check_device(self.device, f"{where}.device")
        require([("long_side", self.long_side >= 14, "must be >= 14"),
                 ("max_scenes", self.max_scenes is None or self.max_scenes >= 1,
                  "must be >= 1 or null")], self, where)
        for i, spec in enumerate(self.benchmarks):
            spec.validate(f"{where}.benchmarks[{i}]")


@dataclass
class Params:
    demo: DemoParams = field(default_factory=DemoParams)
    data: DataParams = field(default_factory=DataParams)
    cache: CacheParams = field(default_factory=CacheParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    model: ModelParams = field(default_factory=ModelParams)
    loss: LossParams = field(default_factory=LossParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    infer: InferParams = field(default_factory=InferParams)
    bench: BenchParams = field(default_factory=BenchParams)
    benchmark: BenchmarkParams = field(default_factory=BenchmarkParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)

    def validate(self) -> None:
        """Every section's ``validate()``; errors name ``<section>.<key>``."""
        for name in self.__dataclass_fields__:
            getattr(self, name).validate(name)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and fully validate a params file; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    try:
        params = from_dict(Params, raw, "params")
        params.validate()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return params
