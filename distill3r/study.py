"""The learned-teacher study's tables (``studies/distill``).

:func:`study_report` gathers one run of the study, from the reports its stages write, into one
flat JSON-able dict (the study's DVC metrics):

- ``teacher.*`` / ``student.*``: each model against the ground truth of the held-out scenes
  (the ``student`` block of its ``eval.json`` on the ground-truth cache), its parameters
  (millions), training seconds and forward seconds per sample;
- ``student_vs_teacher.*``: the student scored against the teacher's own maps (the
  ``student_vs_teacher`` block of the evaluation on the teacher-labelled cache);
- ``retention.*``: the student's accuracy relative to the teacher's, per metric, 1.0 = as good as
  the teacher and higher = better: ``teacher / student`` for errors (AbsRel, Chamfer),
  ``student / teacher`` for scores (RRA@15, mAA(30)); ``null`` where undefined;
- ``params_ratio`` (teacher / student parameters), ``speedup`` (teacher / student forward
  time from the bench stage's rows, at its first view count) and ``eval_speedup`` (the same from
  the two evaluations' forward timings).

:func:`format_markdown` renders it as the study's table, :func:`plot_rows` as one row per
comparison for ``dvc plots``. :func:`ablation_table` compares several runs (DVC experiments)
grouped by configuration, with the spread over seeds.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from distill3r.atomic import replacing

# short key -> (eval.json key, higher is better, column title)
METRICS = {
    "abs_rel": ("depth_abs_rel", False, "AbsRel"),
    "chamfer": ("chamfer", False, "Chamfer"),
    "rra15": ("pnp_rra_15", True, "RRA@15"),
    "maa30": ("pnp_maa_30", True, "mAA(30)"),
}
COST = {"params_m": "params (M)", "train_s": "train (s)", "eval_s": "forward (s/sample)"}


def _number(node: Any, *path: str) -> Optional[float]:
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    return float(node) if math.isfinite(node) else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else float(f"{value:.6g}")


def _accuracy(eval_report: Mapping, block: str) -> dict[str, Optional[float]]:
    return {k: _number(eval_report, block, key) for k, (key, _, _) in METRICS.items()}


def _model_block(eval_report: Mapping, train_report: Mapping) -> dict[str, Optional[float]]:
    return {**_accuracy(eval_report, "student"),
            "params_m": _number(train_report, "parameters_m"),
            "train_s": _number(train_report, "seconds"),
            "eval_s": _number(eval_report, "seconds_per_sample")}


def bench_speedup(bench_report: Optional[Mapping], teacher: str, student: str
                  ) -> Optional[float]:
    """Teacher seconds / student seconds of the bench stage's rows at the first view count both
    ran (None without a bench report or such a pair)."""
    if not bench_report:
        return None
    rows = [r for r in bench_report.get("rows") or [] if not r.get("oom")]
    times = {(r["model"], r["views"]): r["seconds"] for r in rows}
    for views in sorted({v for _, v in times}):
        if (teacher, views) in times and (student, views) in times:
            return _ratio(times[(teacher, views)], times[(student, views)])
    return None


def study_report(teacher_eval: Mapping, student_eval: Mapping, agreement_eval: Mapping,
                 teacher_train: Mapping, student_train: Mapping,
                 bench: Optional[Mapping] = None) -> dict[str, Any]:
    """The study's figures (see the module docstring). ``*_eval`` are evaluate-stage reports
    (``teacher_eval``/``student_eval`` on the ground-truth cache, ``agreement_eval`` the
    student's on the teacher-labelled cache), ``*_train`` the train stage's metrics JSON,
    ``bench`` the bench stage's report. ``ValueError`` if an evaluation scored no sample
    against ground truth (the wrong cache was given)."""
    for name, report in (("teacher", teacher_eval), ("student", student_eval)):
        if not _number(report, "num_samples_gt"):
            raise ValueError(f"the {name}'s evaluation has no sample with ground truth: evaluate"
                             " it on the ground-truth cache")
    teacher = _model_block(teacher_eval, teacher_train)
    student = _model_block(student_eval, student_train)
    retention = {}
    for key, (_, higher, _) in METRICS.items():
        retention[key] = (_ratio(student[key], teacher[key]) if higher
                          else _ratio(teacher[key], student[key]))
    out: dict[str, Any] = {
        "teacher": teacher, "student": student,
        "student_vs_teacher": _accuracy(agreement_eval, "student_vs_teacher"),
        "retention": retention,
        "params_ratio": _ratio(teacher["params_m"], student["params_m"]),
        "speedup": bench_speedup(bench, str(teacher_eval.get("model")),
                                 str(student_eval.get("model"))),
        "eval_speedup": _ratio(teacher["eval_s"], student["eval_s"]),
    }
    out = {k: ({kk: _round(vv) for kk, vv in v.items()} if isinstance(v, dict) else _round(v))
           for k, v in out.items()}
    out["models"] = {"teacher": teacher_eval.get("model"), "student": student_eval.get("model")}
    out["num_samples"] = {"ground_truth": student_eval.get("num_samples_gt"),
                          "agreement": agreement_eval.get("num_samples")}
    return out


def _cell(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_markdown(report: Mapping[str, Any]) -> str:
    """The study's table: one row per comparison (teacher vs GT, student vs GT, student vs
    teacher, retention), then the cost of both models."""
    models = report.get("models") or {}
    head = "| | " + " | ".join(t for _, _, t in METRICS.values()) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    names = (("teacher", f"teacher (`{models.get('teacher')}`) vs ground truth"),
             ("student", f"student (`{models.get('student')}`) vs ground truth"),
             ("student_vs_teacher", "student vs teacher"),
             ("retention", "retention (student / teacher accuracy)"))
    for block, title in names:
        row = report.get(block) or {}
        lines.append(f"| {title} | " + " | ".join(_cell(row.get(k)) for k in METRICS) + " |")
    lines += ["", "| | " + " | ".join(COST.values()) + " |", "|---" * (len(COST) + 1) + "|"]
    for block in ("teacher", "student"):
        row = report.get(block) or {}
        lines.append(f"| {block} (`{models.get(block)}`) | {_cell(row.get('params_m'), 3)} | "
                     f"{_cell(row.get('train_s'), 0)} | {_cell(row.get('eval_s'), 4)} |")
    samples = report.get("num_samples") or {}
    lines += ["", f"Parameters ratio {_cell(report.get('params_ratio'), 2)}x, forward speed-up "
              f"{_cell(report.get('speedup'), 2)}x (bench stage; "
              f"{_cell(report.get('eval_speedup'), 2)}x in the evaluations); "
              f"{samples.get('ground_truth')} held-out samples with ground truth, "
              f"{samples.get('agreement')} teacher-labelled val samples."]
    return "\n".join(lines) + "\n"


def plot_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per comparison (``row``: teacher, student, student_vs_teacher) with the
    :data:`METRICS` keys, for a ``dvc plots`` bar chart."""
    return [{"row": block, **{k: (report.get(block) or {}).get(k) for k in METRICS}}
            for block in ("teacher", "student", "student_vs_teacher")]


def write_plot_rows(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write :func:`plot_rows` as CSV (empty cells where undefined), atomically."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Across runs (DVC experiments)
# ---------------------------------------------------------------------------------------------
def _mean_spread(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    spread = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), spread


def ablation_table(runs: Iterable[Mapping[str, Any]], config_keys: tuple[str, ...],
                   seed_key: str = "train.seed",
                   columns: tuple[str, ...] = ("student.abs_rel", "student.chamfer",
                                               "student.rra15", "student.maa30",
                                               "student_vs_teacher.abs_rel",
                                               "student_vs_teacher.chamfer",
                                               "student.train_s", "student.params_m"),
                   ) -> str:
    """A markdown table of runs grouped by the values of ``config_keys``: per group the seeds,
    and per column the mean over them (``mean ± sample std`` with two or more seeds).

    Args:
        runs: one mapping per run with ``name``, ``params`` (flat dotted keys) and ``metrics``
            (flat dotted keys of :func:`study_report`'s output).
    """
    def text(value: Any) -> str:  # DVC reads YAML ints back as floats: 1.0 -> "1"
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)

    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for run in runs:
        key = tuple(run["params"].get(k) for k in config_keys)
        groups.setdefault(key, []).append(run)
    head = [*config_keys, "seeds", "runs", *columns]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key, members in groups.items():
        seeds = sorted({text(r["params"].get(seed_key)) for r in members})
        cells = [text(v) for v in key] + [", ".join(seeds), ", ".join(r["name"] for r in members)]
        for column in columns:
            values = [float(v) for r in members
                      if isinstance(v := r["metrics"].get(column), (int, float))]
            mean, spread = _mean_spread(values)
            digits = 0 if column.endswith("train_s") else 4
            cells.append(_cell(mean, digits) + ("" if spread is None
                                                else f" ± {spread:.{digits}f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
