"""Each benchmark's protocol: reader, frame selection, table units and Fast3R's published numbers.

Defaults follow Fast3R's evaluation configs (facebookresearch/fast3r):

- ``configs/eval/recon.yaml``: ``8 @ SevenScenes(split='test', resolution=512, num_seq=1,
  num_frames=10, full_video=False)`` and the same for ``NRGBD``: 8 samples of 10 views chosen
  by Spann3R's window rule (:func:`distill3r.benchmarks.sample.window_frames`, upstream
  ``max_thresh=100``); ``DTU(..., full_video=True, kf_every=15)`` (commented out there): every
  15th image of each scan.
- ``configs/eval/eval_cam_pose/default.yaml``: ``100 @ Co3d_Multiview(split='test',
  window_degree_range=360, num_samples_per_window=100, resolution=(512, 384), seed=777)``: 100
  samples whose views come from the whole (360-degree) video. The number of views there is
  ``data.num_views_val`` of the data config (10 in ``recon.yaml``); 10 is our default.
  Upstream reuses one combination of frame indices (plus a +-4 jitter) for every sample; we
  draw fresh views per sample from ``benchmark.seed``.
Resolution: Fast3R gets its own 512-wide input through its adapter whatever the grid; every
model is scored at the same grid (``benchmark.long_side``).

Metrics (:func:`distill3r.evaluation.protocol.evaluate_sample`, the code ``evaluate`` uses):
reconstruction Accuracy / Completeness / normal consistency after one sim(3) on the top-15%
confident pixels; poses from :func:`distill3r.evaluation.poses.estimate_cameras` scored over
all view pairs (RRA@15, RTA@15, mAA(30)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill3r.benchmarks import readers
from distill3r.benchmarks.sample import BenchScene
from distill3r.config import BenchmarkSpec


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is read, sampled and shown.

    ``kinds``: tables it appears in (``recon``, ``pose``); ``scale``: table multiplier of
    distances (x100: metres shown as centimetres, as Fast3R's tables); ``digits``: their
    decimals; ``published``:
    Fast3R's published values (table units) by metric key."""

    name: str
    title: str
    reader: Callable[[Path], list[BenchScene]]
    kinds: tuple[str, ...]
    selection: str
    views: int
    samples: int | None
    kf_every: int = 1
    max_gap: int = 100
    scale: float = 100.0
    unit: str = "x100"
    digits: int = 2  # decimals of distances in the table (as the published numbers)
    published: dict[str, float] = field(default_factory=dict)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("demo", "Demo", readers.demo, ("recon", "pose"), "random", 4, None),
    Protocol("sevenscenes", "7-Scenes", readers.seven_scenes, ("recon",), "window", 10, 8,
             published={"acc_median": 1.58, "comp_median": 0.93}),
    Protocol("nrgbd", "NRGBD", readers.nrgbd, ("recon",), "window", 10, 8,
             published={"acc_median": 3.40, "comp_median": 1.01}),
    # DTU depth and poses are in millimetres: distances are shown in the dataset's units
    Protocol("dtu", "DTU", readers.dtu, ("recon",), "keyframes", 10, None, kf_every=15,
             scale=1.0, unit="mm", digits=3, published={"acc_median": 1.706, "comp_median": 0.857}),
    Protocol("co3d", "CO3Dv2", readers.co3d, ("pose",), "random", 10, 100,
             published={"pnp_rra_15": 96.2, "pnp_rta_15": 81.6, "pnp_maa_30": 75.0}),
)}


@dataclass(frozen=True)
class Resolved:
    """A ``benchmark.benchmarks`` entry with the protocol's defaults filled in."""

    protocol: Protocol
    root: Path | None
    views: int
    samples: int | None
    selection: str
    kf_every: int
    max_gap: int
    split: str | None

    def describe(self) -> dict:
        return {"root": None if self.root is None else str(self.root), "views": self.views,
                "samples": self.samples, "selection": self.selection,
                "kf_every": self.kf_every, "max_gap": self.max_gap, "split": self.split}


def resolve(spec: BenchmarkSpec, where: str = "benchmark.benchmarks") -> Resolved:
    """Check one entry and fill its null fields from the protocol; ``ValueError`` names it."""
    if spec.name not in PROTOCOLS:
        raise ValueError(f"{where}: unknown benchmark {spec.name!r} (known: "
                         f"{', '.join(PROTOCOLS)})")
    p = PROTOCOLS[spec.name]

    def pick(value, default):
        return default if value is None else value

    r = Resolved(p, None if spec.root is None else Path(spec.root), pick(spec.views, p.views),
                 pick(spec.samples, p.samples), pick(spec.selection, p.selection),
                 pick(spec.kf_every, p.kf_every), pick(spec.max_gap, p.max_gap), spec.split)
    checks = [("views", r.views >= 2, "must be >= 2"),
              ("samples", r.samples is None or r.samples >= 1, "must be >= 1 or null"),
              ("selection", r.selection in ("window", "keyframes", "random"),
               "must be window, keyframes or random"),
              ("kf_every", r.kf_every >= 1, "must be >= 1"),
              ("max_gap", r.max_gap >= 1, "must be >= 1"),
              ("split", r.split in (None, "train", "val"), "must be train, val or null")]
    for key, ok, rule in checks:
        if not ok:
            raise ValueError(f"{where} {spec.name}: {key}={getattr(r, key)!r} {rule}")
    if r.split is not None and spec.name != "demo":
        raise ValueError(f"{where} {spec.name}: split applies to the demo benchmark only")
    return r
