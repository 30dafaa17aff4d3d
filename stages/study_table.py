"""Gather the learned-teacher study's reports into its table (``studies/distill``).

    python stages/study_table.py --teacher-eval reports/teacher_eval.json \
        --student-eval reports/student_eval.json --agreement-eval reports/agreement_eval.json \
        --teacher-train reports/teacher_train.json --student-train reports/student_train.json \
        [--bench reports/bench.json] --out reports/study.json --table reports/study.md \
        --plot reports/study_rows.csv

Reads the evaluate stage's reports of both models on the ground-truth cache and of the student
on the teacher-labelled cache, the train stage's metrics of both, and optionally the bench
report; writes the figures (``--out``, the study's DVC metrics), the markdown table and one row
per comparison for ``dvc plots`` (see :mod:`distill3r.study`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.cli import run_stage, stage_parser


def _table(args, params) -> None:
    from distill3r.atomic import replacing
    from distill3r.jsonio import read_json, write_json
    from distill3r.study import format_markdown, plot_rows, study_report, write_plot_rows

    reports = {name: read_json(getattr(args, name), name.replace("_", " ") + " report")
               for name in ("teacher_eval", "student_eval", "agreement_eval", "teacher_train",
                            "student_train")}
    bench = read_json(args.bench, "bench report") if args.bench else None
    report = study_report(**reports, bench=bench)
    write_json(args.out, report)
    table = format_markdown(report)
    with replacing(args.table) as tmp:
        tmp.write_text(table)
    write_plot_rows(args.plot, plot_rows(report))
    print(table, end="")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    for name, what in (("teacher-eval", "the teacher's eval.json on the ground-truth cache"),
                       ("student-eval", "the student's eval.json on the ground-truth cache"),
                       ("agreement-eval", "the student's eval.json on the teacher's cache"),
                       ("teacher-train", "the teacher's train metrics JSON"),
                       ("student-train", "the student's train metrics JSON")):
        parser.add_argument(f"--{name}", required=True, help=what)
    parser.add_argument("--bench", help="the bench stage's report (teacher and student rows)")
    parser.add_argument("--out", required=True, help="the study's figures (JSON) to write")
    parser.add_argument("--table", required=True, help="the markdown table to write")
    parser.add_argument("--plot", required=True, help="the CSV rows for dvc plots to write")
    return run_stage("study_table", parser, _table, argv)


if __name__ == "__main__":
    sys.exit(main())
