"""Benchmark stage: analytic FLOPs against torch's counter, one real row per subprocess, the
report files, the summary arithmetic and clear errors for bad params."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from distill3r.bench import (BenchCase, bench_stage, format_table, plan_cases, run_case,
                             summarize)
from distill3r.config import BenchParams
from distill3r.flops import forward_flops
from distill3r.models import build_student, get_config


def _counted_flops(name: str, batch: int, views: int, height: int, width: int) -> int:
    """FlopCounterMode on the real model. The math SDPA backend is forced because the counter
    has no formula for the CPU flash-attention kernel (it would count attention as 0)."""
    torch.manual_seed(0)
    model = build_student(name).eval()
    images = torch.rand(batch, views, 3, height, width)
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), \
            FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


@pytest.mark.parametrize("name,batch,views,height,width", [
    ("tiny", 1, 2, 56, 84),     # odd token grid (4x6 -> stride-2 level 2x3)
    ("tiny", 2, 3, 70, 42),     # batch > 1, odd grid 5x3, portrait
    ("paper", 1, 1, 70, 98),    # the real 72M student at one small shape
    ("tiny-pose", 2, 3, 42, 56),  # a pose global head instead of the second DPT head
    ("tiny-conv", 1, 2, 56, 70),  # a convolutional patch stem
    ("tiny-skip", 2, 2, 42, 70),  # DPT heads with an image branch
    ("tiny-pyramid", 1, 3, 42, 70),  # the image branch as a conv pyramid, odd grid
    ("tiny-pyramid-local", 1, 2, 42, 56),  # ... in the local head only
    ("tiny-pyramid-full", 1, 2, 42, 56),  # ... plus the full-resolution image branch
    ("tiny-deep", 2, 2, 42, 42),  # a 6-block decoder, hooks [0, 3, 4, 6]
])
def test_analytic_flops_match_flop_counter(name, batch, views, height, width):
    counted = _counted_flops(name, batch, views, height, width)
    analytic = forward_flops(get_config(name), views, height, width, batch=batch)["total"]
    assert counted > 0
    assert abs(analytic - counted) / counted < 0.01, (analytic, counted)


def test_flops_reproduce_the_issue_reference_figures():
    """FlopCounterMode figures quoted in the issue (GFLOP at 224x224 for 2 / 8 / 16 views)."""
    figures = {"paper": (267, 1099, 2275), "fast3r-large": (689, 2936, 6356)}
    for name, expected in figures.items():
        cfg = get_config(name)
        for views, gflop in zip((2, 8, 16), expected):
            got = forward_flops(cfg, views, 224, 224)["total"] / 1e9
            assert abs(got - gflop) / gflop < 0.01, (name, views, got, gflop)
    parts = forward_flops(get_config("paper"), 2, 224, 224)
    assert 0.83 < parts["heads"] / parts["total"] < 0.88  # "the two DPT heads are ~85%"


@pytest.mark.slow
def test_row_runs_in_a_fresh_process_and_is_valid():
    case = BenchCase(model="tiny", views=2, height=28, width=42, repeats=2, warmup=1, threads=1)
    row = run_case(case, timeout=120)
    assert row["oom"] is False and row["model"] == "tiny" and row["views"] == 2
    for key in ("seconds", "seconds_min", "cpu_seconds", "gflops", "gflops_heads", "tflops_per_s",
                "peak_mb", "base_mb", "weights_mb", "net_peak_mb", "params"):
        assert row[key] > 0, key
    assert len(row["seconds_all"]) == 2 and row["threads"] == 1
    assert row["peak_mb"] >= row["base_mb"] + row["weights_mb"] - 1e-6
    expected = forward_flops(get_config("tiny"), 2, 28, 42)["total"] / 1e9
    assert row["gflops"] == pytest.approx(expected)
    assert row["params"] == sum(p.numel() for p in build_student("tiny").parameters())


@pytest.mark.slow  # two benchmark processes and a figure
def test_stage_writes_json_metrics_and_png(tmp_path):
    params = BenchParams(models=["tiny"], views=[1, 3], image_size=[28, 28], repeats=1,
                         warmup=0, threads=1, reference="fast3r-large")
    out, plot = tmp_path / "reports" / "bench.json", tmp_path / "reports" / "bench.png"
    lines = []
    bench_stage(params, out, plot, log=lines.append)
    report = json.loads(out.read_text())
    assert [(r["model"], r["views"]) for r in report["rows"]] == [("tiny", 1), ("tiny", 3)]
    assert set(report["metrics"]["tiny"]) == {"views_1", "views_3"}
    metrics = report["metrics"]["tiny"]
    assert metrics["views_3"]["gflops"] > metrics["views_1"]["gflops"] > 0
    assert report["settings"]["models"] == ["tiny"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("tiny" in line and "GFLOP" in line for line in lines)  # the printed table


def _row(model, views, seconds, peak, gflops, base=700.0):
    return {"model": model, "views": views, "height": 224, "width": 224, "seconds": seconds,
            "peak_mb": peak, "net_peak_mb": peak - base, "activation_mb": 1.0, "gflops": gflops,
            "params": 1, "tflops_per_s": gflops / seconds / 1e3}


def test_summary_ratios_and_checks():
    rows = [_row("paper", 8, 1.0, 900, 1000), _row("paper", 16, 2.0, 910, 2000),
            _row("ref", 8, 3.0, 2000, 3000), _row("ref", 16, 6.0, 2100, 6000),
            _row("paper", 4, 0.5, 800, 500)]
    summary = summarize(rows, "ref")
    paper = summary["models"]["paper"]
    at16 = paper["vs_reference"]["views_16"]
    assert at16["speedup"] == pytest.approx(3.0) and at16["compute_ratio"] == pytest.approx(3.0)
    assert at16["speed_vs_compute"] == pytest.approx(1.0)
    assert at16["memory_ratio"] == pytest.approx(910 / 2100)
    assert at16["net_memory_ratio"] == pytest.approx(210 / 1400)
    assert paper["peak_mb_per_view"] == pytest.approx([25.0, 1.25])  # 4->8, 8->16
    checks = paper["checks"]
    assert checks["speed_vs_compute_ge_80pct_top2"] and checks["speedup_ge_2p5_largest"]
    assert checks["memory_le_third_largest"]  # 210/1400 net, although 910/2100 absolute
    assert checks["memory_at_most_linear"]
    assert "speed-up 3.00x" in format_table(rows, summary)


@pytest.mark.parametrize("overrides,match", [
    ({"models": ["paper", "nope"]}, r"bench\.models.*nope"),
    ({"models": []}, r"bench\.models"),
    ({"views": [2, 0]}, r"bench\.views.*>= 1"),
    ({"image_size": [230, 224]}, r"bench\.image_size.*patch size 14.*'paper'"),
    ({"image_size": [210, 210]}, r"bench\.image_size.*patch size 16.*'fast3r-large'"),
    ({"model_image_sizes": [[224, 224]]}, r"bench\.model_image_sizes.*one \[H, W\] per model"),
    ({"profile": "gpu"}, r"bench\.profile"),
    ({"dtype": "int8"}, r"bench\.dtype.*int8.*bf16"),
    ({"repeats": 0}, r"bench\.repeats"),
    ({"device": "cpu", "profile": "paper"}, r"bench\.profile 'paper'.*CUDA"),
    ({"profile": "many_views", "models": ["fast3r-large"]}, r"bench\.models.*many_views"),
])
def test_bad_params_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        plan_cases(BenchParams(**overrides))


def test_plan_per_model_sizes_and_defaults():
    cases = plan_cases(BenchParams(views=[4, 2], model_image_sizes=[[392, 518], [384, 512]],
                                   device="cpu"))
    assert [(c.model, c.views, c.height, c.width) for c in cases] == [
        ("paper", 2, 392, 518), ("paper", 4, 392, 518),
        ("fast3r-large", 2, 384, 512), ("fast3r-large", 4, 384, 512)]
    assert all(c.device == "cpu" and c.dtype == "bf16" for c in cases)
    default = plan_cases(BenchParams(device="cpu"))
    assert {(c.height, c.width) for c in default} == {(224, 224)} and len(default) == 8


def test_paper_profile_uses_the_published_shapes():
    from distill3r.bench import PAPER_VIEWS, _model_sizes

    params = BenchParams(profile="paper", device="cpu")
    assert _model_sizes(params) == [[392, 518], [384, 512]]  # patch 14 student, patch 16 Fast3R
    assert PAPER_VIEWS == [12, 32, 64, 96, 128]


def test_paper_profile_runs_students_to_1000_views_and_the_reference_to_128():
    from distill3r.bench import _profile_views

    params = BenchParams(profile="paper", device="cuda")  # planned, not run: no GPU needed
    assert _profile_views(params, "paper") == [12, 32, 64, 96, 128, 256, 512, 1000]
    assert _profile_views(params, "fast3r-large") == [12, 32, 64, 96, 128]


def test_many_views_profile_plans_infer_rows_of_the_students():
    cases = plan_cases(BenchParams(profile="many_views", models=["tiny", "fast3r-large"],
                                   device="cpu"))
    assert [(c.model, c.views, c.height, c.width, c.kind) for c in cases] == [
        ("tiny", n, 112, 112, "infer") for n in (32, 64, 128, 256, 512, 1024)]


def test_infer_row_times_the_whole_infer_path():
    from distill3r.bench import measure_case

    row = measure_case(BenchCase(model="tiny", views=3, height=28, width=28, dtype="fp32",
                                 device="cpu", threads=1, kind="infer"))
    # in-process here, so the process's earlier peak may hide the run's: net >= 0 (a bench row
    # runs in a fresh process)
    assert not row["oom"] and row["seconds"] > 0 and row["peak_mb"] > row["net_peak_mb"] >= 0
    assert row["seconds"] >= row["timings_s"]["forward"] > 0
    assert row["gflops"] == pytest.approx(forward_flops(get_config("tiny"), 3, 28, 28)["total"]
                                          / 1e9)
