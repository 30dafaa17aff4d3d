"""The benchmark stage: every configured benchmark x model, one report and one Markdown table.

:func:`run_benchmarks` reads each benchmark whose root exists (a null or missing root is
skipped with a message, so the stage runs anywhere), plans its samples
(:func:`distill3r.benchmarks.sample.sample_plan`, seeded), loads each sample once at the grid
(long side ``benchmark.long_side``, sides multiples of every model's ``multiple``), runs every
model on it and scores it with :func:`distill3r.evaluation.protocol.evaluate_sample` against the
benchmark's ground truth (``eval`` params: top-confident fraction, PnP threshold, points,
percentile). The report holds, per benchmark and model, the mean of every metric over samples
(:func:`aggregate_metrics`), ``seconds_per_scene`` (model call only) and ``peak_memory_mb``
(CUDA: peak allocated during that model's calls; CPU: the process's peak resident size so far).
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

from distill3r.atomic import replacing
from distill3r.benchmarks.models import BenchModel
from distill3r.benchmarks.protocols import PROTOCOLS, Resolved, resolve
from distill3r.benchmarks.sample import BenchScene, load_sample, sample_plan
from distill3r.config import Params
from distill3r.evaluation.protocol import aggregate_metrics, evaluate_sample
from distill3r.evaluation.runner import write_report

log = logging.getLogger(__name__)

RECON_COLUMNS = (("Acc", "acc_mean", "acc_median"), ("Comp", "comp_mean", "comp_median"),
                 ("NC", "nc", None))
POSE_COLUMNS = (("RRA@15", "pnp_rra_15"), ("RTA@15", "pnp_rta_15"), ("mAA(30)", "pnp_maa_30"))


def demo_split(scenes: list[BenchScene], split: str, params: Params) -> list[BenchScene]:
    """The demo scenes of one split of the manifest's rule (``data.split_salt``,
    ``data.val_fraction``, dataset name ``demo``)."""
    from distill3r.data.build import assign_splits

    splits = assign_splits([("demo", s.name) for s in scenes], params.data.val_fraction,
                           params.data.split_salt)
    return [s for s in scenes if splits[("demo", s.name)] == split]


def _peak_mb(device_type: str) -> float:
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _cuda(models: dict[str, BenchModel]) -> bool:
    return any(getattr(getattr(m, "device", None), "type", "") == "cuda"
               for m in models.values())


def score_benchmark(res: Resolved, scenes: list[BenchScene], models: dict[str, BenchModel],
                    params: Params) -> dict[str, dict[str, Any]]:
    """``{model: metrics}`` of one benchmark (see the module docstring)."""
    bp, ep = params.benchmark, params.eval
    kw = {"conf_top_fraction": ep.conf_top_fraction, "pnp_reprojection_px":
          ep.pnp_reprojection_px, "max_points": ep.max_points, "seed": ep.seed,
          "conf_percentile": ep.conf_percentile}
    multiple = math.lcm(*(m.multiple for m in models.values()))
    plan = sample_plan(scenes, res.protocol.name, res.selection, res.views, res.samples,
                       bp.seed, res.max_gap, res.kf_every)
    cuda = _cuda(models)
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    seconds = {name: 0.0 for name in models}
    peak = {name: 0.0 for name in models}
    for scene, key, indices in plan:
        sample = load_sample(res.protocol.name, scene, key, indices, bp.long_side, multiple)
        ref = {"depth": sample.depth, "K": sample.K, "c2w": sample.c2w}
        for name, model in models.items():
            if cuda:
                import torch

                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            pred = model.predict(sample)
            if cuda:
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
            peak[name] = max(peak[name], _peak_mb("cuda" if cuda else "cpu"))
            scores[name].append(evaluate_sample(pred, ref, **kw))
        log.info("%s: %s (%d views, %dx%d) scored", res.protocol.name, key, len(indices),
                 *sample.size)
    out = {}
    for name in models:
        agg = aggregate_metrics(scores[name])
        agg["seconds_per_scene"] = seconds[name] / max(1, len(plan))
        agg["peak_memory_mb"] = peak[name]
        out[name] = agg
    return out


def run_benchmarks(params: Params, models: dict[str, BenchModel], out_json: str | Path,
                   out_table: str | Path | None = None) -> dict:
    """Score ``models`` on every benchmark of ``params.benchmark``; write the report (and the
    Markdown table); return the report as written."""
    bp = params.benchmark
    if bp.long_side < 16:
        raise ValueError(f"benchmark.long_side={bp.long_side}: must be >= 16")
    report: dict[str, Any] = {"results": {}, "skipped": {}, "grid_long_side": bp.long_side,
                              "models": {n: m.describe() for n, m in models.items()},
                              "protocols": {}}
    for i, spec in enumerate(bp.benchmarks):
        res = resolve(spec, f"benchmark.benchmarks[{i}]")
        name = res.protocol.name
        report["protocols"][name] = res.describe()
        if res.root is None or not res.root.is_dir():
            why = ("no root set" if res.root is None else f"{res.root} not found")
            msg = f"{name}: {why}: skipped (set benchmark.benchmarks[{i}].root, see README)"
            log.warning("%s", msg)
            print(f"benchmark: {msg}")
            report["skipped"][name] = msg
            continue
        scenes = res.protocol.reader(res.root)
        if res.split is not None:
            scenes = demo_split(scenes, res.split, params)
        if bp.max_scenes is not None:
            scenes = scenes[:bp.max_scenes]
        if not scenes:
            raise ValueError(f"{res.root}: no {res.protocol.title} scenes found")
        report["results"][name] = score_benchmark(res, scenes, models, params)
    report = write_report(report, Path(out_json))
    if out_table is not None:
        with replacing(out_table) as tmp:
            Path(tmp).write_text(format_tables(report))
    return report


# ---------------------------------------------------------------------------------------------
# Markdown (the layout of Fast3R's tables: a column group per benchmark, a row per method)
# ---------------------------------------------------------------------------------------------
def _num(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _benchmarks_of(report: dict, kind: str) -> list[str]:
    return [b for b in PROTOCOLS if kind in PROTOCOLS[b].kinds
            and (b in report["results"] or PROTOCOLS[b].published)]


def _rows(report: dict, names: list[str]) -> list[str]:
    models: list[str] = []
    for b in names:
        models.extend(m for m in report["results"].get(b, {}) if m not in models)
    return models


def recon_table(report: dict) -> str:
    names = _benchmarks_of(report, "recon")
    head = ["Method"] + [f"{PROTOCOLS[b].title} {c} ({PROTOCOLS[b].unit})" if c != "NC"
                         else f"{PROTOCOLS[b].title} NC" for b in names for c, _, _ in
                         RECON_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in _rows(report, names) + ["Fast3R (published)"]:
        cells = [model]
        for b in names:
            p = PROTOCOLS[b]
            m = report["results"].get(b, {}).get(model)
            for _, mean, median in RECON_COLUMNS:
                if m is None:
                    pub = p.published if model == "Fast3R (published)" else {}
                    cells.append("-" if median is None or median not in pub
                                 else f"- / {pub[median]:.{p.digits}f}")
                elif median is None:
                    cells.append(_num(m.get(mean), 1.0, 3))
                else:
                    cells.append(f"{_num(m.get(mean), p.scale, p.digits)} / "
                                 f"{_num(m.get(median), p.scale, p.digits)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pose_table(report: dict) -> str:
    names = _benchmarks_of(report, "pose")
    head = ["Method"] + [f"{PROTOCOLS[b].title} {c}" for b in names for c, _ in POSE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in _rows(report, names) + ["Fast3R (published)"]:
        cells = [model]
        for b in names:
            m = report["results"].get(b, {}).get(model)
            pub = PROTOCOLS[b].published if model == "Fast3R (published)" else {}
            for _, key in POSE_COLUMNS:
                cells.append(_num(m.get(key), 100.0, 1) if m is not None
                             else (f"{pub[key]:.1f}" if key in pub else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(report: dict) -> str:
    lines = ["| Benchmark | Method | samples | s / scene | peak memory (MiB) |",
             "|---|---|---|---|---|"]
    for b, per_model in report["results"].items():
        for model, m in per_model.items():
            lines.append(f"| {PROTOCOLS[b].title} | {model} | {m.get('num_samples')} | "
                         f"{_num(m.get('seconds_per_scene'), 1.0, 3)} | "
                         f"{_num(m.get('peak_memory_mb'), 1.0, 0)} |")
    return "\n".join(lines)


def format_tables(report: dict) -> str:
    """The report as Markdown: reconstruction (mean / median), poses (%), cost, skipped."""
    parts = ["## Reconstruction (Accuracy, Completeness: mean / median; lower is better)",
             recon_table(report), "", "## Camera poses (%, higher is better)", pose_table(report),
             "", "## Cost", cost_table(report)]
    if report.get("skipped"):
        parts += ["", "Skipped: " + "; ".join(report["skipped"].values())]
    return "\n".join(parts) + "\n"

