"""The bench stage's outputs: a plain-text table, ``bench.json`` and the figure, from the rows
and summary of :mod:`distill3r.bench`."""

from __future__ import annotations

from pathlib import Path

from distill3r.jsonio import write_json


def format_table(rows: list[dict], summary: dict) -> str:
    """A plain-text table of the rows and the ratios against the reference."""
    head = (f"{'model':>12} {'views':>5} {'HxW':>8} {'params':>7} {'GFLOP':>8} {'s':>8} "
            f"{'cpu s':>8} {'TFLOP/s':>7} {'peak MB':>8} {'net MB':>7} {'act MB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['height']}x{r['width']}"
        if r.get("oom"):
            lines.append(f"{r['model']:>12} {r['views']:5d} {shape:>8}   out of memory")
            continue
        lines.append(
            f"{r['model']:>12} {r['views']:5d} {shape:>8} {r['params'] / 1e6:6.1f}M "
            f"{r['gflops']:8.1f} {r['seconds']:8.3f} {r.get('cpu_seconds') or 0:8.3f} "
            f"{r['tflops_per_s']:7.3f} "
            f"{r['peak_mb']:8.0f} {r['net_peak_mb']:7.0f} {r['activation_mb']:7.0f}")
    for model, entry in summary["models"].items():
        steps = ", ".join(f"{a}->{b}: {s:.1f}" for (a, b), s in
                          zip(entry["views_pairs"], entry["peak_mb_per_view"]))
        lines.append(f"{model}: peak MB per added view {steps}")
        for ratio in entry.get("vs_reference", {}).values():
            lines.append(
                f"  vs {summary['reference']} at {ratio['views']:3d} views: speed-up "
                f"{ratio['speedup']:.2f}x, compute ratio {ratio['compute_ratio']:.2f}x "
                f"(speed/compute {ratio['speed_vs_compute']:.2f}), memory "
                f"{ratio['memory_ratio']:.2f} (net {ratio['net_memory_ratio']:.2f})"
                + (f", CPU-time speed-up {ratio['cpu_time_speedup']:.2f}x"
                   if "cpu_time_speedup" in ratio else ""))
        for name, passed in entry.get("checks", {}).items():
            lines.append(f"  check {name}: {'pass' if passed else 'FAIL'}")
    return "\n".join(lines)


def write_report(rows: list[dict], summary: dict, settings: dict, path: str | Path) -> Path:
    """``bench.json``: ``rows`` (a list, for plots and people), ``metrics`` (the same numbers
    keyed ``model -> views_N``, which ``dvc metrics show`` reads), ``summary``, ``settings``."""
    keys = ("seconds", "peak_mb", "net_peak_mb", "activation_mb", "gflops", "params")
    metrics = {}
    for r in rows:
        if not r.get("oom"):
            metrics.setdefault(r["model"], {})[f"views_{r['views']}"] = {k: r[k] for k in keys}
    payload = {"settings": settings, "rows": rows, "metrics": metrics, "summary": summary}
    return write_json(path, payload)


def plot_report(rows: list[dict], summary: dict, path: str | Path) -> Path:
    """Time and peak memory versus views for every model, and speed-up against compute ratio."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model and not r.get("oom")),
                      key=lambda r: r["views"])
        views = [r["views"] for r in mine]
        line = axes[0].plot(views, [r["seconds"] for r in mine], "o-", label=model)[0]
        axes[1].plot(views, [r["peak_mb"] for r in mine], "o-", color=line.get_color(),
                     label=f"{model} peak")
        axes[1].plot(views, [r["net_peak_mb"] for r in mine], "o--", color=line.get_color(),
                     label=f"{model} peak - runtime")
        ratios = list(summary["models"].get(model, {}).get("vs_reference", {}).values())
        if ratios:
            rv = [q["views"] for q in ratios]
            axes[2].plot(rv, [q["speedup"] for q in ratios], "o-", color=line.get_color(),
                         label=f"{model}: measured speed-up")
            axes[2].plot(rv, [q["compute_ratio"] for q in ratios], "s:",
                         color=line.get_color(), label=f"{model}: FLOP ratio")
    titles = ("inference time (s)", "memory (MB)", f"ratio vs {summary['reference']}")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("views")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
