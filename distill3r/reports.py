"""The headline metrics: about ten numbers that ``dvc metrics show`` / ``dvc exp show`` compare.

The detailed reports (``eval.json``, ``train.json``) stay plain stage outputs; this file is the
one declared as DVC metrics, so experiment tables stay readable. Keys are short on purpose (they
are column names); a value is ``null`` where its report lacks it.
"""

from __future__ import annotations

from typing import Any, Mapping

# key -> (report, path inside it)
HEADLINE = {
    "abs_rel": ("eval", ("student", "depth_abs_rel")),
    "delta1": ("eval", ("student", "depth_delta1")),
    "chamfer": ("eval", ("student", "chamfer")),
    "global_chamfer": ("eval", ("student", "global_head_chamfer")),
    "nc": ("eval", ("student", "nc")),
    "rra15": ("eval", ("student", "pnp_rra_15")),
    "maa30": ("eval", ("student", "pnp_maa_30")),
    "prior_abs_rel": ("eval", ("layout_prior", "depth_abs_rel")),
    "eval_s": ("eval", ("seconds_per_sample",)),
    "val_loss": ("train", ("final_val", "loss")),
    "train_s": ("train", ("seconds",)),
    "params_m": ("train", ("parameters_m",)),
}


def _get(report: Mapping[str, Any] | None, path: tuple[str, ...]) -> Any:
    node: Any = report
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def headline_metrics(eval_report: Mapping[str, Any] | None,
                     train_report: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The :data:`HEADLINE` values from the evaluate and train reports (rounded to 6
    significant digits: they are for reading, the detailed reports keep full precision)."""
    reports = {"eval": eval_report, "train": train_report}
    out: dict[str, float | None] = {}
    for key, (report, path) in HEADLINE.items():
        value = _get(reports[report], path)
        out[key] = None if value is None else float(f"{value:.6g}")
    return out
