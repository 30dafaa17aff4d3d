"""The evaluate stage on a real (tiny) demo cache: report layout, the ground-truth teacher scores
perfectly, baselines and agreement are present, MLflow logging into the training run, and clear
errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import runpy
from pathlib import Path

import pytest
import torch
import yaml

from distill3r.cache.reader import read_split
from distill3r.cache.writer import build_cache
from distill3r.config import CacheParams, DataParams, DemoParams, Params, SourceParams
from distill3r.data.build import build_manifest
from distill3r.data.demo import render_demo
from distill3r.evaluation.runner import (BLOCKS, GT_BLOCKS, format_table, run_evaluation,
                                         score_sample, summarise)
from distill3r.models import build_student, save_student
from distill3r.tracking import (log_report, read_run_ref, report_metrics, start_run,
                               write_run_ref)
from services import free_port

ROOT = Path(__file__).resolve().parents[1]
CACHE = CacheParams(image_size=[28, 28], views_per_sample=3, max_samples_per_scene=2,
                    shard_max_samples=2)


def _params(**eval_overrides) -> Params:
    p = Params()
    p.cache = CACHE
    p.eval = dataclasses.replace(p.eval, **eval_overrides)
    return p


def _cache(root: Path, manifest: Path, name: str, size: list[int]) -> Path:
    p = Params()
    p.cache = dataclasses.replace(CACHE, image_size=size)
    build_cache(manifest, root / name, p, progress=False)
    return root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3 demo scenes x 4 views (64x64) -> manifest (2 train / 1 val scenes) -> 28x28 cache of
    the ground-truth teacher, plus a saved student of the shipped model config."""
    root = tmp_path_factory.mktemp("evaluate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's 2 cores are shared: avoid oversubscription
    render_demo(root / "raw", DemoParams(num_scenes=3, views_per_scene=4, height=64, width=64,
                                         workers=0), progress=False)
    sources = [SourceParams(kind="demo", root=str(root / "raw"))]
    build_manifest(DataParams(sources=sources, val_fraction=0.34), root / "m.csv", root / "img")
    build_manifest(DataParams(sources=sources, val_fraction=0.0), root / "m0.csv", root / "img0")
    student = save_student(build_student(Params().model.name), root / "student")
    yield {"root": root, "student": student, "manifest": root / "m.csv",
           "cache": _cache(root, root / "m.csv", "cache", [28, 28]),
           "cache_no_val": _cache(root, root / "m0.csv", "cache0", [28, 28])}
    torch.set_num_threads(threads)


def _mlflow_run(tmp_path: Path) -> tuple[str, str, Path]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run(Params(), uri, experiment="eval-test", run_name="train",
                   system_metrics=False) as run:
        ref = write_run_ref(tmp_path / "mlflow_run.json", run, uri)
    return uri, ref.run_id, tmp_path / "mlflow_run.json"


@pytest.mark.slow  # ~10 s of it is MLflow creating its SQLite schema
def test_report_scores_and_mlflow_logging(world, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, run_id, ref_path = _mlflow_run(tmp_path)
    out = tmp_path / "reports" / "eval.json"
    result = run_evaluation(_params(), world["student"], world["cache"], out, progress=False)
    assert log_report(result.report, read_run_ref(ref_path)) == run_id
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)
    assert report == result.report
    assert report["num_samples"] == 2 == report["num_samples_gt"]  # 1 val scene x 2 samples
    assert report["seconds_per_sample"] > 0 and report["dtype"] == "bfloat16"
    config = json.loads((world["student"] / "config.json").read_text())
    assert report["checkpoint"] == config["sha256"]
    for block in BLOCKS:
        assert report[block]["num_samples"] == 2, block
        assert report[block]["chamfer"] is not None, block
    for block in GT_BLOCKS[1:]:  # an untrained student may predict no positive depth at all
        assert report[block]["depth_abs_rel"] is not None, block
    assert set(report["student"]) == set(report["baseline"]) == set(report["layout_prior"])
    assert report["per_dataset"].keys() == {"demo"}
    assert report["per_dataset"]["demo"]["student"] == report["student"]
    # the ground-truth teacher is exact up to float16 storage
    teacher = report["teacher"]
    assert teacher["depth_abs_rel"] < 1e-3 and teacher["depth_delta1"] == 1.0
    assert teacher["chamfer"] < 5e-3 and teacher["pnp_rra_15"] == 1.0
    assert report["student"]["chamfer"] > 10 * teacher["chamfer"]  # untrained
    # the layout prior is fitted on the train split's depth; it beats a constant plane here
    assert report["layout_prior_train_views"] == 2 * 2 * 3
    assert report["layout_prior"]["depth_abs_rel"] < report["baseline"]["depth_abs_rel"]
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged["eval.student.chamfer"] == pytest.approx(report["student"]["chamfer"])
    assert logged["eval.baseline.depth_abs_rel"] == pytest.approx(
        report["baseline"]["depth_abs_rel"])
    assert logged["eval.teacher.chamfer"] == pytest.approx(teacher["chamfer"])
    assert logged["eval.per_dataset.demo.layout_prior.num_samples"] == 2
    assert logged["eval.num_samples"] == 2 and "eval.checkpoint" not in logged
    assert logged.keys() == report_metrics(report).keys()
    table = format_table(report)
    for row in ("student", "teacher", "baseline", "layout_prior"):
        assert row in table
    assert "AbsRel" in table and "mAA30" in table


def test_without_ground_truth_only_agreement(world):
    samples = list(read_split(world["cache"] / "val"))
    bare = {k: v for k, v in samples[0].items() if k not in ("depth", "K", "c2w")}
    pred = {k: bare[k].numpy() for k in ("xyz_global", "xyz_local", "conf_global",
                                         "conf_local")}
    scores = score_sample(bare, pred, None, _params().eval)
    assert set(scores) == {"student_vs_teacher"}
    assert scores["student_vs_teacher"]["chamfer"] < 5e-3  # the teacher agrees with itself
    full = score_sample(samples[1], pred, None, _params().eval)
    assert set(full) == {"student", "teacher", "baseline", "student_vs_teacher"}
    report = summarise([("a", scores), ("b", full)])
    assert report["student_vs_teacher"]["num_samples"] == 2
    assert report["student"]["num_samples"] == 1
    assert report["layout_prior"]["num_samples"] == 0
    assert report["layout_prior"]["chamfer"] is None  # same keys, null values
    assert set(report["layout_prior"]) == set(report["student"])
    assert report["per_dataset"]["a"]["student"]["num_samples"] == 0


def test_stage_cli_max_samples_batches_and_unreachable_mlflow(world, tmp_path, monkeypatch,
                                                              capsys, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    ref = {"run_id": "0" * 32, "experiment_id": "1",
           "tracking_uri": f"http://127.0.0.1:{free_port()}"}
    (tmp_path / "run.json").write_text(json.dumps(ref))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["eval"]["batch_size"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    main = runpy.run_path(str(ROOT / "stages" / "evaluate.py"))["main"]
    out = tmp_path / "eval.json"
    code = main(["--params", str(tmp_path / "params.yaml"), "--checkpoint",
                 str(world["student"]), "--cache", str(world["cache"]), "--out", str(out),
                 "--run-ref", str(tmp_path / "run.json"), "--max-samples", "1", "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["num_samples"] == 1 and report["student"]["num_samples"] == 1
    printed = capsys.readouterr().out
    assert "layout_prior" in printed and "MLflow run" not in printed
    assert "MLflow logging to run" in caplog.text  # warned, and eval.json still written


def test_deterministic_rerun_and_batching(world, tmp_path):
    def run(name: str, **overrides) -> dict:
        report = run_evaluation(_params(**overrides), world["student"], world["cache"],
                                tmp_path / f"{name}.json", progress=False).report
        assert report.pop("seconds_per_sample") > 0
        return report

    one = run("fp32", dtype="fp32", workers=1)
    assert one == run("again", dtype="fp32", workers=1)  # same order, seeds and numbers
    assert one == run("pool", dtype="fp32", workers=2)  # scored in two worker processes
    assert one["dtype"] == "float32"
    two = run("fp32_b2", dtype="fp32", batch_size=2)
    assert two["student"]["chamfer"] == pytest.approx(one["student"]["chamfer"], rel=1e-3)
    assert two["teacher"] == one["teacher"] and two["layout_prior"] == one["layout_prior"]


@pytest.mark.parametrize("case, match", [
    ("no_checkpoint", "checkpoint folder not found"),
    ("empty_val", "has no samples"),
    ("patch", "not a multiple of the student's patch size 14"),
    ("other_config", "params model.name is 'paper'"),
    ("bad_weights", "cannot load the student"),
])
def test_bad_input_errors(world, tmp_path, capsys, case, match):
    student, cache, params = world["student"], world["cache"], _params()
    if case == "no_checkpoint":
        student = tmp_path / "missing"
    elif case == "empty_val":
        cache = world["cache_no_val"]
    elif case == "patch":
        cache = _cache(tmp_path, world["manifest"], "cache30", [30, 30])
    elif case == "other_config":
        params.model = dataclasses.replace(params.model, name="paper")
    elif case == "bad_weights":
        student = tmp_path / "student"
        save_student(build_student(Params().model.name), student)
        meta = json.loads((student / "config.json").read_text())
        meta["config"]["dec_depth"], meta["config"]["hooks"] = 3, [0, 1, 2, 3]
        (student / "config.json").write_text(json.dumps(meta))
    out = tmp_path / "eval.json"
    with pytest.raises(ValueError, match=match):
        run_evaluation(params, student, cache, out, progress=False)
    assert not out.exists()
    if case == "no_checkpoint":  # the stage turns it into a message and exit code 1
        main = runpy.run_path(str(ROOT / "stages" / "evaluate.py"))["main"]
        code = main(["--params", str(ROOT / "params.yaml"), "--checkpoint", str(student),
                     "--cache", str(cache), "--out", str(out), "--no-progress"])
        assert code == 1
        assert "evaluate: error: " in capsys.readouterr().err


def test_bad_worker_count_is_refused_before_any_work(world, tmp_path):
    out = tmp_path / "eval.json"
    with pytest.raises(ValueError, match=r"eval\.workers.*must be >= 1 or null"):
        run_evaluation(_params(workers=0), world["student"], world["cache"], out, progress=False)
    assert not out.exists()
