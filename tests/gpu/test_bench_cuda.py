"""The bench's CUDA path: rows timed with CUDA events, memory from ``max_memory_allocated``."""

from __future__ import annotations

from distill3r.bench import BenchCase, run_case


def test_bench_rows_on_cuda_use_events_and_allocator_peak(report):
    rows = [run_case(BenchCase(model="paper", views=n, height=224, width=224, dtype="bf16",
                               device="cuda", repeats=3, warmup=1), timeout=300)
            for n in (2, 8)]
    for row in rows:
        assert row["memory"] == "cuda_max_allocated" and row["cpu_seconds"] is None
        assert 0 < row["seconds"] < 10 and len(row["seconds_all"]) == 3
        assert row["peak_mb"] > row["weights_mb"] > 0
    assert rows[1]["peak_mb"] > rows[0]["peak_mb"]  # more views, more activations
    report("bench_cuda", {f"views_{r['views']}": {"seconds": r["seconds"],
                                                   "peak_mb": r["peak_mb"]} for r in rows})
