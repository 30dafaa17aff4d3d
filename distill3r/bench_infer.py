"""One ``many_views`` bench row: the whole streamed ``infer`` path of one scene, in this process.

:func:`measure_infer_case` (run by ``python -m distill3r.bench --row`` in a fresh process, like
every bench row) sets the thread count, saves the named student with seeded random weights
(float32, as training writes it) and ``N`` seeded random-noise views of ``H x W`` into a
temporary folder, then times one :func:`distill3r.inference.run_inference` call: image
loading, the streamed forward, the percentile, the PLY, cameras and preview, i.e. everything
``stages/infer.py`` does after parsing. One cold run per row (``repeats`` and ``warmup`` do not
apply: a warm second run would hide the first-run costs a user pays). Memory is the peak
resident set (``ru_maxrss``) of the process; on CUDA also ``max_memory_allocated``.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill3r.bench import peak_rss_mb

_MB = 2.0**20


def write_scene(folder: Path, views: int, height: int, width: int, seed: int) -> Path:
    """``views`` seeded random-noise PNGs ``00000.png...`` of ``height x width`` in ``folder``."""
    from distill3r.data.io import write_image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(views):
        write_image(folder / f"{i:05d}.png", rng.integers(0, 256, (height, width, 3), np.uint8))
    return folder


def measure_infer_case(case, threads: int) -> dict:
    """The row of ``case`` (a :class:`distill3r.bench.BenchCase` with ``kind="infer"``)."""
    from distill3r.config import InferParams
    from distill3r.flops import forward_flops
    from distill3r.inference import run_inference
    from distill3r.models import build_student, save_student

    torch.set_num_threads(threads)
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    row = dataclasses.asdict(case)
    with tempfile.TemporaryDirectory(prefix="distill3r-bench-infer-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(case.seed)
        model = build_student(case.model, head_chunk_size=case.head_chunk_size)
        row.update(threads=threads, params=sum(p.numel() for p in model.parameters()))
        ckpt = save_student(model, tmp / "student")
        cfg = model.config
        del model
        scene = write_scene(tmp / "scene", case.views, case.height, case.width, case.seed + 1)
        params = InferParams(size=max(case.height, case.width), device=case.device,
                             dtype=case.dtype, preview_views=2, seed=case.seed,
                             scratch_dir=str(tmp))
        before_mb = peak_rss_mb()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        begin, cpu_begin = time.perf_counter(), time.process_time()
        try:
            (info,) = run_inference(scene, ckpt, tmp / "out", params)
        except torch.OutOfMemoryError:
            row.update(oom=True, seconds=None, peak_mb=None)
            return row
        seconds, cpu = time.perf_counter() - begin, time.process_time() - cpu_begin
    peak_rss = peak_rss_mb()
    peak = torch.cuda.max_memory_allocated(device) / _MB if cuda else peak_rss
    base = 0.0 if cuda else before_mb  # CPU: the runtime, a model build and the images
    flops = forward_flops(cfg, case.views, case.height, case.width)
    row.update(
        oom=False, seconds=seconds, seconds_min=seconds, seconds_all=[seconds],
        cpu_seconds=None if cuda else cpu, timings_s=info["timings_s"],
        gflops=flops["total"] / 1e9, **{f"gflops_{k}": v / 1e9 for k, v in flops.items()
                                        if k != "total"},
        tflops_per_s=flops["total"] / seconds / 1e12,
        memory="cuda_max_allocated" if cuda else "peak_rss", peak_mb=peak,
        peak_rss_mb=peak_rss, base_mb=base, weights_mb=0.0, activation_mb=peak - base,
        net_peak_mb=peak - base, build_peak_mb=before_mb)
    return row
