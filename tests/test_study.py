"""The learned-teacher study's tables: figures, retention, speed-up, markdown, ablation groups."""

import csv

import pytest

from distill3r.study import (ablation_table, format_markdown, plot_rows, study_report,
                             write_plot_rows)


def _eval(model, abs_rel, chamfer, rra, maa, seconds, gt=8):
    block = {"depth_abs_rel": abs_rel, "chamfer": chamfer, "pnp_rra_15": rra, "pnp_maa_30": maa}
    return {"model": model, "student": block, "student_vs_teacher": block,
            "num_samples": 8, "num_samples_gt": gt, "seconds_per_sample": seconds}


def _report(**kw):
    args = dict(
        teacher_eval=_eval("tiny", 0.10, 0.20, 0.80, 0.40, 0.3),
        student_eval=_eval("micro", 0.20, 0.40, 0.40, None, 0.1),
        agreement_eval={"model": "micro", "num_samples": 8, "student_vs_teacher": {
            "depth_abs_rel": 0.05, "chamfer": 0.1, "pnp_rra_15": 0.9, "pnp_maa_30": 0.5}},
        teacher_train={"seconds": 600.0, "parameters_m": 7.87},
        student_train={"seconds": 200.0, "parameters_m": 1.67},
        bench={"rows": [{"model": "tiny", "views": 4, "seconds": 0.5},
                        {"model": "micro", "views": 4, "seconds": 0.2},
                        {"model": "micro", "views": 8, "oom": True}]})
    args.update(kw)
    return study_report(**args)


def test_study_report_figures_and_retention():
    r = _report()
    assert r["teacher"] == {"abs_rel": 0.1, "chamfer": 0.2, "rra15": 0.8, "maa30": 0.4,
                            "params_m": 7.87, "train_s": 600.0, "eval_s": 0.3}
    assert r["student_vs_teacher"]["abs_rel"] == 0.05
    # errors: teacher / student; scores: student / teacher; undefined stays None
    assert r["retention"] == {"abs_rel": 0.5, "chamfer": 0.5, "rra15": 0.5, "maa30": None}
    assert r["params_ratio"] == pytest.approx(7.87 / 1.67, rel=1e-5)
    assert r["speedup"] == 2.5 and r["eval_speedup"] == 3.0
    assert r["models"] == {"teacher": "tiny", "student": "micro"}
    assert _report(bench=None)["speedup"] is None


def test_study_report_rejects_an_evaluation_without_ground_truth():
    with pytest.raises(ValueError, match="student's evaluation has no sample with ground truth"):
        _report(student_eval=_eval("micro", 0.2, 0.4, 0.4, 0.1, 0.1, gt=0))


def test_markdown_and_plot_rows(tmp_path):
    r = _report()
    table = format_markdown(r)
    assert "| student (`micro`) vs ground truth | 0.200 | 0.400 | 0.400 | - |" in table
    assert "| retention (student / teacher accuracy) | 0.500 | 0.500 | 0.500 | - |" in table
    assert "forward speed-up 2.50x" in table
    path = write_plot_rows(tmp_path / "rows.csv", plot_rows(r))
    rows = list(csv.DictReader(path.open()))
    assert [row["row"] for row in rows] == ["teacher", "student", "student_vs_teacher"]
    assert rows[1]["abs_rel"] == "0.2" and rows[1]["maa30"] == ""


def test_ablation_table_groups_seeds_with_their_spread():
    def run(name, weighting, seed, abs_rel):
        return {"name": name, "params": {"loss.weighting": weighting, "train.seed": seed},
                "metrics": {"student.abs_rel": abs_rel, "student.chamfer": "!"}}

    table = ablation_table([run("a", "teacher", 0, 0.2), run("b", "teacher", 1.0, 0.4),
                            run("c", "none", 0, 0.3)], ("loss.weighting",),
                           columns=("student.abs_rel", "student.chamfer"))
    lines = table.splitlines()
    assert lines[0] == "| loss.weighting | seeds | runs | student.abs_rel | student.chamfer |"
    assert lines[2] == "| teacher | 0, 1 | a, b | 0.3000 ± 0.1414 | - |"
    assert lines[3] == "| none | 0 | c | 0.3000 | - |"


def test_study_params_load_and_agree():
    """The study's params files are valid, and what must match between them does: the student
    learns and is scored on the same view sampling of the same split, teacher and student are
    scored alike, the student is smaller than its teacher, set B is not set A."""
    from pathlib import Path

    from distill3r.config import load_params, to_dict
    from distill3r.models import count_parameters, get_config
    from distill3r.models.student import Student

    study = Path(__file__).resolve().parents[1] / "studies" / "distill"
    teacher, student, truth = (load_params(study / f"{n}.yaml")
                               for n in ("teacher", "params", "groundtruth"))
    assert to_dict(student.cache) == to_dict(truth.cache)
    assert to_dict(teacher.eval) == to_dict(student.eval)
    (unlabeled,), (labelled,) = student.data.sources, truth.data.sources
    assert (unlabeled.kind, labelled.kind) == ("images", "demo")
    assert unlabeled.root == labelled.root and unlabeled.name == labelled.name
    for key in ("val_fraction", "split_salt"):
        assert getattr(student.data, key) == getattr(truth.data, key)
    assert student.demo.seed != teacher.demo.seed
    assert (student.teacher.name, truth.teacher.name) == ("checkpoint", "groundtruth")
    assert student.bench.models == [teacher.model.name, student.model.name]

    def size(name):
        import torch

        with torch.device("meta"):
            return count_parameters(Student(get_config(name)))["total"]

    assert size(student.model.name) < size(teacher.model.name)
