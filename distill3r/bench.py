"""Efficiency benchmark: inference time, peak memory and FLOPs versus the number of views.

Every (model, views) row runs in a fresh interpreter (``python -m distill3r.bench --row JSON``)
so rows never share allocator state, caches or a memory high-water mark. The child:

1. sets the torch thread count (``threads``; 0 = every core the process may use) and records
   the process memory before any model exists (``base_mb``);
2. builds the named model with seeded random weights directly on the device and directly in
   the compute dtype (``torch.set_default_dtype`` during construction: a bf16 run never holds
   fp32 weights, which for the 648M-parameter ``fast3r-large`` halves memory and build time;
   done for every model so the comparison is even), optionally channels-last conv weights;
3. runs ``warmup`` forwards, then ``repeats`` timed forwards of one ``[1, N, 3, H, W]`` input
   under ``torch.inference_mode()`` and autocast(dtype); time = median (CUDA events on GPU);
4. memory: on CUDA ``max_memory_allocated`` over the forwards (weights included); on CPU the
   peak resident set (``ru_maxrss``) of the child, i.e. runtime + weights + activations.
   ``base_mb`` (runtime: interpreter, torch and timm libraries), ``weights_mb`` (added by the
   model and the input) and ``activation_mb = peak_mb - base_mb - weights_mb`` are reported
   too; ``net_peak_mb = peak_mb - base_mb`` is the CPU analogue of CUDA's allocated peak.

Each row carries the analytic forward FLOPs (:mod:`distill3r.flops`) so the measured speed
ratio can be held against the compute ratio. Profiles: ``cpu`` takes models, views and sizes
from the params; ``paper`` is the published table's setting (views 12..128; 392x518 for a
patch-14 student, 384x512 for the patch-16 reference), meant for a CUDA machine, with the
students (not the reference: Fast3R's own 1000-view figure is 137.6 s / 63 GB on an A100) also
at 256, 512 and 1000 views; ``many_views`` times the whole streamed ``infer`` path
(:mod:`distill3r.bench_infer`, one cold run per row) of every model but the reference at
32..1024 views of 112x112, on any device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch
from distill3r.progress import progress_bar

from distill3r.config import BenchParams
from distill3r.devices import autocast, parse_dtype, resolve_device
from distill3r.flops import forward_flops
from distill3r.bench_report import format_table, plot_report, write_report
from distill3r.models import build_student, get_config

ROW_MARKER = "DISTILL3R_BENCH_ROW "
PAPER_VIEWS = [12, 32, 64, 96, 128]
PAPER_MANY_VIEWS = [256, 512, 1000]  # students only (see the module docstring)
MANY_VIEWS = [32, 64, 128, 256, 512, 1024]
MANY_VIEWS_SIZE = [112, 112]
PAPER_SIZES = {14: [392, 518], 16: [384, 512]}  # by patch size: the published 4:3 inputs
_MB = 2.0**20


@dataclass(frozen=True)
class BenchCase:
    """One row: a model at one shape, with the run settings."""

    model: str
    views: int
    height: int
    width: int
    dtype: str = "bf16"
    device: str = "cpu"
    repeats: int = 3
    warmup: int = 1
    threads: int = 0
    head_chunk_size: int = 4
    channels_last: bool = True
    seed: int = 0
    kind: str = "forward"  # forward: the model's forward; infer: the streamed infer path


# Planning (validates the params)
def _model_sizes(params: BenchParams) -> list[list[int]]:
    if params.profile == "paper":
        return [PAPER_SIZES.get(get_config(m).patch_size, params.image_size) for m in params.models]
    if params.profile == "many_views":
        return [list(MANY_VIEWS_SIZE) for _ in params.models]
    if params.model_image_sizes is None:
        return [list(params.image_size) for _ in params.models]
    if len(params.model_image_sizes) != len(params.models):
        raise ValueError(f"bench.model_image_sizes: {len(params.model_image_sizes)} sizes for "
                         f"{len(params.models)} models; give one [H, W] per model or null")
    return [list(size) for size in params.model_image_sizes]


def plan_cases(params: BenchParams) -> list[BenchCase]:
    """The rows to run, models-major; ``ValueError`` naming the ``bench.*`` key for bad params
    (``BenchParams.validate``, then what depends on the models and the machine: a size that is
    not a multiple of the model's patch, a missing device, a ``paper`` profile on a CPU, a
    ``many_views`` profile without a student)."""
    params.validate("bench")
    models = list(params.models)
    if params.profile == "many_views":
        models = [m for m in models if m != params.reference]
        if not models:
            raise ValueError(f"bench.models: profile 'many_views' runs every model but the "
                             f"reference ({params.reference!r}); list a student")
    try:
        device = resolve_device(params.device)
    except ValueError as exc:
        raise ValueError(f"bench.device: {exc}") from exc
    if params.profile == "paper" and device.type == "cpu":
        raise ValueError("bench.profile 'paper' (up to 1000 views of 392x518) is meant for a "
                         "CUDA device and would take hours on a CPU; use profile 'cpu'")
    key = "image_size" if params.model_image_sizes is None else "model_image_sizes"
    cases = []
    for model, size in zip(params.models, _model_sizes(params)):
        if model not in models:
            continue
        cfg = get_config(model)
        if len(size) != 2 or min(size) < 1 or size[0] % cfg.patch_size or size[1] % cfg.patch_size:
            raise ValueError(f"bench.{key}: {size} (H, W) is not a positive multiple of the "
                             f"patch size {cfg.patch_size} of model {model!r}")
        for n in _profile_views(params, model):
            cases.append(BenchCase(
                model=model, views=n, height=size[0], width=size[1], dtype=params.dtype,
                device=str(device), repeats=params.repeats, warmup=params.warmup,
                threads=params.threads, head_chunk_size=params.head_chunk_size,
                channels_last=params.channels_last, seed=params.seed,
                kind="infer" if params.profile == "many_views" else "forward"))
    return cases


def _profile_views(params: BenchParams, model: str) -> list[int]:
    if params.profile == "paper":
        return PAPER_VIEWS + ([] if model == params.reference else PAPER_MANY_VIEWS)
    if params.profile == "many_views":
        return list(MANY_VIEWS)
    return sorted(set(params.views))


# One row (runs inside the child process)
def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / _MB


def peak_rss_mb() -> float:
    """This process's peak resident set so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / _MB if sys.platform == "darwin" else peak / 1024.0


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _cpu_threads(requested: int) -> int:
    if requested > 0:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _time_forward(model: torch.nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """Wall seconds of one forward and the process CPU seconds it used (the latter is robust
    to other programs on a shared CPU when ``threads`` is 1; meaningless on CUDA)."""
    cpu_begin = time.process_time()
    if images.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = model(images)
        end.record()
        torch.cuda.synchronize(images.device)
        seconds = start.elapsed_time(end) / 1000.0
    else:
        begin = time.perf_counter()
        out = model(images)
        seconds = time.perf_counter() - begin
    del out  # never hold one output while the next forward runs
    return seconds, time.process_time() - cpu_begin


def measure_case(case: BenchCase) -> dict:
    """Build, warm up and time one case in this process; returns the row (see module doc)."""
    threads = _cpu_threads(case.threads)
    if case.kind == "infer":
        from distill3r.bench_infer import measure_infer_case

        return measure_infer_case(case, threads)
    device, dtype = torch.device(case.device), parse_dtype(case.dtype)
    torch.set_num_threads(threads)
    cuda = device.type == "cuda"
    base_mb = torch.cuda.memory_allocated(device) / _MB if cuda else _rss_mb()
    torch.manual_seed(case.seed)
    with torch.device(device), _default_dtype(dtype):
        model = build_student(case.model, head_chunk_size=case.head_chunk_size).eval()
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(case.seed + 1)
    images = torch.rand(1, case.views, 3, case.height, case.width, generator=generator).to(device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    model_mb = torch.cuda.memory_allocated(device) / _MB if cuda else _rss_mb()
    build_peak_mb = None if cuda else peak_rss_mb()
    row = dataclasses.asdict(case)
    row.update(threads=threads, params=sum(p.numel() for p in model.parameters()))
    try:
        with torch.inference_mode(), autocast(device, dtype):
            for _ in range(case.warmup):
                _time_forward(model, images)
            seconds, cpu = zip(*[_time_forward(model, images) for _ in range(case.repeats)])
    except torch.OutOfMemoryError:
        row.update(oom=True, seconds=None, peak_mb=None)
        return row
    peak_mb = torch.cuda.max_memory_allocated(device) / _MB if cuda else peak_rss_mb()
    flops = forward_flops(model.config, case.views, case.height, case.width)
    median = statistics.median(seconds)
    row.update(
        oom=False, seconds=median, seconds_min=min(seconds), seconds_all=list(seconds),
        cpu_seconds=None if cuda else statistics.median(cpu),
        gflops=flops["total"] / 1e9, **{f"gflops_{k}": v / 1e9 for k, v in flops.items()
                                        if k != "total"},
        tflops_per_s=flops["total"] / median / 1e12,
        memory="cuda_max_allocated" if cuda else "peak_rss",
        peak_mb=peak_mb, base_mb=base_mb, weights_mb=model_mb - base_mb,
        activation_mb=peak_mb - model_mb, net_peak_mb=peak_mb - base_mb,
        build_peak_mb=build_peak_mb)
    return row


# Orchestration (parent process)
def run_case(case: BenchCase, timeout: Optional[float] = None) -> dict:
    """Run one case in a fresh ``python -m distill3r.bench --row`` process; the row it prints.
    A child killed by SIGKILL (the CPU out-of-memory killer) gives a row with ``oom: true``."""
    cmd = [sys.executable, "-m", "distill3r.bench", "--row", json.dumps(dataclasses.asdict(case))]
    env = dict(os.environ, OMP_NUM_THREADS=str(_cpu_threads(case.threads)))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode == -9:
        return dict(dataclasses.asdict(case), oom=True, seconds=None, peak_mb=None)
    rows = [line[len(ROW_MARKER):] for line in proc.stdout.splitlines()
            if line.startswith(ROW_MARKER)]
    if proc.returncode != 0 or len(rows) != 1:
        raise RuntimeError(f"bench row {case} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(rows[0])


def run_cases(cases: list[BenchCase], log: Callable[[str], None] = print,
              progress: bool = False) -> list[dict]:
    """Every case (see :func:`plan_cases`), each in its own process, in order."""
    rows = []
    for case in progress_bar(cases, desc="bench", unit="row", disable=not progress):
        begin = time.perf_counter()
        row = run_case(case)
        rows.append(row)
        if row.get("oom"):
            log(f"  {case.model:>12} {case.views:4d} views: out of memory")
        else:
            log(f"  {case.model:>12} {case.views:4d} views {case.height}x{case.width}: "
                f"{row['seconds']:.3f} s, peak {row['peak_mb']:.0f} MB "
                f"(row took {time.perf_counter() - begin:.0f} s)")
    return rows


# Summary, table, report files
def _increments(pairs: list[tuple[int, float]]) -> list[float]:
    return [(b - a) / (vb - va) for (va, a), (vb, b) in zip(pairs, pairs[1:])]


def summarize(rows: list[dict], reference: str) -> dict:
    """Per model: memory growth per added view; against ``reference`` (when both ran) per view
    count: ``speedup`` (reference time / model time), ``compute_ratio`` (reference FLOPs / model
    FLOPs), ``speed_vs_compute`` (their quotient), ``memory_ratio`` (peak / reference peak) and
    ``net_memory_ratio`` (``net_peak_mb`` ratio); plus the issue's checks at the largest views."""
    ok = {(r["model"], r["views"]): r for r in rows if not r.get("oom")}
    summary: dict = {"reference": reference, "models": {}}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((v, r) for (m, v), r in ok.items() if m == model)
        entry: dict = {
            "peak_mb_per_view": _increments([(v, r["peak_mb"]) for v, r in mine]),
            "views_pairs": [[a, b] for (a, _), (b, _) in zip(mine, mine[1:])],
        }
        if len(mine) >= 2:
            (v0, r0), (v1, r1) = mine[0], mine[-1]
            entry["mean_mb_per_view"] = (r1["peak_mb"] - r0["peak_mb"]) / (v1 - v0)
        if model != reference:
            ratios = {}
            for views, r in mine:
                ref = ok.get((reference, views))
                if ref is None:
                    continue
                speedup = ref["seconds"] / r["seconds"]
                compute = ref["gflops"] / r["gflops"]
                ratios[f"views_{views}"] = {
                    "views": views, "speedup": speedup, "compute_ratio": compute,
                    "speed_vs_compute": speedup / compute,
                    "memory_ratio": r["peak_mb"] / ref["peak_mb"],
                    "net_memory_ratio": r["net_peak_mb"] / ref["net_peak_mb"]}
                if r.get("cpu_seconds") and ref.get("cpu_seconds"):  # CPU-time cross-check
                    ratios[f"views_{views}"]["cpu_time_speedup"] = (ref["cpu_seconds"]
                                                                    / r["cpu_seconds"])
            entry["vs_reference"] = ratios
            entry["checks"] = _checks(list(ratios.values()), entry)
        summary["models"][model] = entry
    return summary


def _checks(ratios: list[dict], entry: dict) -> dict:
    """The issue's targets for a student against the reference (True/False; {} if no pairs)."""
    if not ratios:
        return {}
    top, last = ratios[-2:], ratios[-1]
    steps = entry["peak_mb_per_view"]
    return {
        "speed_vs_compute_ge_80pct_top2": all(r["speed_vs_compute"] >= 0.8 for r in top),
        "speedup_ge_2p5_largest": last["speedup"] >= 2.5,
        # memory the model run allocates: CUDA max_allocated on GPU, peak RSS net of the
        # runtime on CPU (the absolute RSS ratio is reported, not checked: ~700 MB of the
        # CUDA-enabled torch libraries sit in both processes and no model can offset them)
        "memory_le_third_largest": last["net_memory_ratio"] <= 1 / 3,
        # at most linear: the last increment per view is no steeper than the mean (+5 MB slack)
        "memory_at_most_linear": (not steps
                                  or steps[-1] <= entry.get("mean_mb_per_view", 0.0) + 5.0),
    }


def bench_stage(params: BenchParams, out_json: str | Path, out_plot: str | Path,
                log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run every row, write ``out_json`` and ``out_plot``, log the table; returns the summary."""
    cases = plan_cases(params)
    log(f"bench: {len(cases)} rows ({params.profile} profile, {params.dtype}, "
        f"{cases[0].device}), one process each")
    rows = run_cases(cases, log, progress)
    summary = summarize(rows, params.reference)
    settings = dict(dataclasses.asdict(params), device_resolved=cases[0].device,
                    torch=torch.__version__, cpu_threads=_cpu_threads(params.threads))
    write_report(rows, summary, settings, out_json)
    plot_report(rows, summary, out_plot)
    log(format_table(rows, summary))
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    """Child entry point: ``python -m distill3r.bench --row '{"model": ..., ...}'``."""
    parser = argparse.ArgumentParser(description="Measure one benchmark row (internal).")
    parser.add_argument("--row", required=True, help="a BenchCase as JSON")
    args = parser.parse_args(argv)
    case = BenchCase(**json.loads(args.row))
    print(ROW_MARKER + json.dumps(measure_case(case)), flush=True)


if __name__ == "__main__":
    main()
