"""Typed parameters: one dataclass per section of ``params.yaml``.

``load_params(path)`` returns a :class:`Params` whose sections are dataclasses. Unknown keys,
missing required keys and wrongly typed values raise ``ValueError`` naming the section, the key
and the file, so a typo in ``params.yaml`` (or in ``dvc exp run -S``) never passes silently.
Each stage reads only the sections it declares in ``dvc.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class DemoParams:
    """The built-in demo dataset: pybullet renders of closed textured rooms with objects."""

    num_scenes: int = 64
    views_per_scene: int = 12
    height: int = 224
    width: int = 224
    seed: int = 0
    workers: int = 2  # parallel render processes (0 or 1: in-process)
    objects_min: int = 3
    objects_max: int = 6
    min_object_distance: float = 0.5  # metres; cameras closer to an object are rejected
    orbit_degrees: float = 120.0  # the partial orbit the cameras of one scene span


@dataclass
class SourceParams:
    """One source dataset of the manifest (``kind`` selects the reader class)."""

    kind: str = "demo"
    root: str = "data/raw/demo"
    name: Optional[str] = None  # dataset name in the manifest (defaults to kind)
    sample_frac: float = 1.0  # fraction of scenes kept (stable, by hash)
    options: dict[str, Any] = field(default_factory=dict)  # the kind's own options (README)


@dataclass
class DataParams:
    """The manifest: which sources, the split and the image size on disk."""

    sources: list[SourceParams] = field(default_factory=lambda: [SourceParams()])
    val_fraction: float = 0.15
    resize_max: int = 960  # longest image edge after preprocessing (aspect kept)
    min_frames: int = 2  # scenes with fewer frames are reported and skipped
    split_salt: str = "distill3r"  # the stable scene hash that decides train/val


@dataclass
class DatasetSampling:
    """``cache.dataset_sampling`` entry: the view sampling of one manifest dataset; a null field
    keeps the cache-wide value."""

    dataset: str  # the manifest's dataset name
    sampling: Optional[str] = None
    frame_stride: Optional[int] = None
    neighbours: Optional[int] = None
    max_samples_per_scene: Optional[int] = None


@dataclass
class CacheParams:
    """Teacher cache: view sampling and WebDataset shards."""

    image_size: list[int] = field(default_factory=lambda: [112, 112])  # [H, W], multiples of 14
    views_per_sample: int = 4
    max_samples_per_scene: int = 4
    sampling: str = "random"  # "random" subsets, "stride" (consecutive) or "nearby" (overlap)
    frame_stride: int = 1
    neighbours: int = 8  # nearby: views come from an anchor's nearest frames (>= views - 1)
    dataset_sampling: list[DatasetSampling] = field(default_factory=list)  # per-dataset
    seed: int = 0
    shard_max_samples: int = 64
    shard_max_bytes: int = 256_000_000
    conf_max: float = 60000.0  # confidences are clamped to [1, conf_max] (float16-finite)


@dataclass
class TeacherParams:
    """Which teacher fills the cache and how it runs."""

    name: str = "groundtruth"  # "groundtruth" | "fast3r"
    checkpoint: str = "jedyang97/Fast3R_ViT_Large_512"  # HF id or local folder (fast3r)
    device: str = "auto"
    dtype: str = "bf16"  # "fp32" | "bf16" (fast3r)
    image_size: int = 512  # fast3r input long side
    conf_threshold: float = 1.5  # mask = conf > threshold (confidence is always >= 1)
    seed: int = 0
    edge_threshold: float = 0.05  # groundtruth: relative depth jump that marks an edge
    edge_confidence: float = 2.0  # groundtruth: confidence at depth edges
    max_confidence: float = 20.0  # groundtruth: confidence of clean pixels


@dataclass
class ModelParams:
    """The student: a named configuration plus run-time options."""

    name: str = "tiny"  # "paper" | "tiny" | "fast3r-large"
    encoder_weights: Optional[str] = None  # DUNE checkpoint path, or null for random init
    head_chunk_size: int = 8  # views per DPT-head chunk (bounds memory at many views)


@dataclass
class LossParams:
    """Confidence-aware distillation loss (REFERENCE section 2)."""

    alpha_global: float = 2.0
    alpha_local: float = 1.0
    gamma_conf: float = 0.001
    weighting: str = "teacher"  # "teacher" | "none" | "student"
    conf_scale: float = 10.0
    w_min: float = 0.1


@dataclass
class TrainParams:
    """Lightning training."""

    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "bf16-mixed"
    batch_size: int = 4
    accumulate_grad_batches: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr: float = 5e-5
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 2
    threads: Optional[int] = None  # torch threads per process; null: torch's default, or
    # cores / processes per node under CPU DDP (oversubscribed OpenMP threads spin and crawl)
    views: Optional[int] = None  # views per training sample (random subset); null: all cached
    shuffle_view0: bool = False
    color_jitter: float = 0.1
    val_every_steps: int = 100
    checkpoint_every_steps: int = 100
    log_every_steps: int = 10
    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "distill3r"
    system_metrics: bool = True


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
    dtype: str = "bf16"  # autocast dtype where the device supports it ("fp32" disables)
    layout_prior_max_samples: Optional[int] = None  # train samples fitting the layout prior


@dataclass
class InferParams:
    """Inference on a folder of images."""

    size: int = 112  # long side in pixels (rounded to the patch size)
    conf_percentile: float = 10.0  # keep points whose local confidence is at/above it
    device: str = "auto"
    max_points: int = 2_000_000  # cap on exported points (deterministic subset)
    dtype: str = "bf16"  # autocast dtype where the device supports it ("fp32" disables)
    pnp_reprojection_px: float = 5.0  # camera estimation (PnP-RANSAC inlier threshold)
    preview_views: int = 6  # views shown in the preview PNG
    seed: int = 0
    view_chunk: int = 8  # views per encoder / DPT-head chunk (streamed inference)
    token_chunk: int = 8192  # decoder tokens per chunk outside attention's keys and values
    scratch_dir: Optional[str] = None  # per-view float16 map store; null: the system temp


@dataclass
class BenchParams:
    """Efficiency benchmark: time and memory versus number of views."""

    profile: str = "cpu"  # "cpu": the fields below; "paper": the published table's shapes (GPU)
    models: list[str] = field(default_factory=lambda: ["paper", "fast3r-large"])
    views: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    image_size: list[int] = field(default_factory=lambda: [224, 224])  # [H, W]
    model_image_sizes: Optional[list[list[int]]] = None  # one [H, W] per model (overrides)
    reference: str = "fast3r-large"  # speed-up, compute and memory ratios are taken against it
    dtype: str = "bf16"  # autocast dtype; weights are also built directly in it (not fp32)
    repeats: int = 3
    warmup: int = 1
    device: str = "auto"
    threads: int = 0  # CPU threads per row (0: every core this process may use)
    head_chunk_size: int = 4  # views per DPT-head chunk, the same for every model
    channels_last: bool = True  # conv weights (and so DPT activations) in channels-last layout
    seed: int = 0


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


# ----------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (building nested dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, values: dict[str, Any] | None, where: str | None = None) -> Any:
    """Build dataclass ``cls`` from ``values``; reject unknown keys and wrong types."""
    where = where or cls.__name__
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where}: missing required key {f.name}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass (or nested structure of them) as plain dicts and lists."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values): for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return from_dict(Params, raw, "params")
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
