"""The published inference setting: the ``paper`` student on 64 views at 392x518 in bf16."""

from __future__ import annotations

import time

import torch

from distill3r.devices import autocast
from distill3r.models import build_student

VIEWS, HEIGHT, WIDTH = 64, 392, 518


def test_paper_student_64_views_at_392x518(report):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_student("paper").to(device).eval()
    images = torch.rand(1, VIEWS, 3, HEIGHT, WIDTH, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    with torch.inference_mode(), autocast(device, torch.bfloat16):
        out = model(images)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    for key in ("xyz_global", "xyz_local"):
        assert out[key].shape == (1, VIEWS, HEIGHT, WIDTH, 3)
        assert torch.isfinite(out[key].float()).all()
    for key in ("conf_global", "conf_local"):
        assert out[key].shape == (1, VIEWS, HEIGHT, WIDTH) and (out[key] >= 1).all()
    # the published figure is 21.8 GB on an RTX 6000 Ada; leave room for other kernels
    assert peak_gb < 40
    report("infer_64_views", {"seconds_first_call": seconds, "peak_gb": peak_gb})
