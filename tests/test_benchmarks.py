"""Benchmarks: readers in the published layouts, the protocol's scores for perfect and
perturbed models, wrong conventions caught, the Fast3R and student paths, and the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from benchmark_fixtures import WRITERS, TruthModel, rotation_z, write_nrgbd, write_seven_scenes

from distill3r.benchmarks import run_benchmarks
from distill3r.benchmarks.models import Fast3RModel, GroundTruthModel, PlaneModel, StudentModel
from distill3r.benchmarks.sample import (BenchFrame, BenchScene, keyframes, sample_plan,
                                         window_frames)
from distill3r.config import (BenchmarkParams, BenchmarkSpec, EvalParams, Params,
                              TeacherParams)
from distill3r.geometry import invert_pose

torch.set_num_threads(1)


def _params(name, root, views=3, samples=2, **kw) -> Params:
    spec = BenchmarkSpec(name=name, root=str(root), views=views, samples=samples, **kw)
    return Params(benchmark=BenchmarkParams(benchmarks=[spec], long_side=64),
                  eval=EvalParams(max_points=3000))


def _score(tmp_path, name, models, **kw):
    root = tmp_path / name
    report = run_benchmarks(_params(name, root, **kw), models, tmp_path / "report.json",
                            tmp_path / "table.md")
    return report["results"][name]


@pytest.mark.parametrize("name", list(WRITERS))
def test_perfect_model_scores_exactly(tmp_path, name):
    truth = WRITERS[name](tmp_path / name)
    # DTU: one sample per scan, every 2nd image (the protocol's keyframes, kf_every 15 upstream)
    kw = {"samples": None, "kf_every": 2} if name == "dtu" else {}
    res = _score(tmp_path, name, {"truth": TruthModel(truth), "groundtruth": GroundTruthModel()},
                 **kw)
    unit = 1000.0 if name == "dtu" else 1.0  # DTU is in millimetres
    for model in ("truth", "groundtruth"):
        m = res[model]
        assert m["num_samples"] == (1 if name == "dtu" else 2)
        # depth PNGs in mm (7-Scenes, NRGBD) quantise to 0.5 mm: ~1e-4 m
        assert m["acc_median"] < 1e-3 * unit and m["comp_median"] < 1e-3 * unit, (model, m)
        assert m["acc_mean"] < 2e-3 * unit and m["nc"] > 0.99
        assert m["pnp_rra_15"] == 1.0 and m["pnp_rta_15"] == 1.0 and m["pnp_maa_30"] > 0.9
    plane = _score(tmp_path, name, {"plane": PlaneModel()}, **kw)["plane"]
    assert plane["acc_mean"] > 20 * res["truth"]["acc_mean"]


def test_known_rotation_error_scores_the_hand_computed_values(tmp_path):
    """View 1 turned 10.5 degrees about its optical axis (camera centre kept): every pair's
    rotation error is 10.5 degrees and the translation error 0, so RRA@5 = 0, RRA@15 = RTA@15
    = 1 and mAA(30) = share of the thresholds 1..30 above 10.5 = 20/30."""
    truth = WRITERS["co3d"](tmp_path / "co3d")
    m = _score(tmp_path, "co3d", {"rot": TruthModel(truth, {1: rotation_z(10.5)})},
               views=2, samples=3)["rot"]
    assert m["pnp_rot_err"] == pytest.approx(10.5, abs=1e-3)
    assert m["pnp_trans_err"] == pytest.approx(0.0, abs=1e-3)
    assert (m["pnp_rra_5"], m["pnp_rra_15"], m["pnp_rta_15"]) == (0.0, 1.0, 1.0)
    assert m["pnp_maa_30"] == pytest.approx(20 / 30)


def test_known_translation_and_scale_errors(tmp_path):
    """View 1's centre moved 0.3 m along its own x axis: the translation-direction error is the
    angle between t and t + R (0.3, 0, 0), computed here by hand; a global scale of 3 changes
    nothing (the protocol is similarity-invariant)."""
    truth = WRITERS["co3d"](tmp_path / "co3d")
    shift = np.eye(4)
    shift[0, 3] = 0.3
    models = {"shift": TruthModel(truth, {1: shift}), "scaled": TruthModel(truth, scale=3.0)}
    res = _score(tmp_path, "co3d", models, views=2, samples=2)
    params = _params("co3d", tmp_path / "co3d", views=2, samples=2)
    from distill3r.benchmarks.readers import co3d

    expected = []
    for scene, key, idx in sample_plan(co3d(tmp_path / "co3d"), "co3d", "random", 2, 2,
                                       params.benchmark.seed):
        f0, f1 = (truth[(scene.name, scene.frames[i].label)] for i in idx)
        rel = invert_pose(f0.c2w) @ f1.c2w
        t, t2 = rel[:3, 3], rel[:3, 3] + rel[:3, :3] @ shift[:3, 3]
        expected.append(np.degrees(np.arccos(t @ t2 / np.linalg.norm(t) / np.linalg.norm(t2))))
    assert res["shift"]["pnp_trans_err"] == pytest.approx(np.mean(expected), abs=1e-2)
    assert res["shift"]["pnp_rot_err"] == pytest.approx(0.0, abs=1e-3)
    assert res["scaled"]["acc_median"] < 1e-3 and res["scaled"]["pnp_rra_15"] == 1.0
    assert res["scaled"]["pnp_rot_err"] < 1e-3


@pytest.mark.parametrize("name,writer", [
    ("nrgbd", lambda r: write_nrgbd(r, gl=False)),  # OpenCV poses where OpenGL belong
    ("sevenscenes", lambda r: write_seven_scenes(r, pose="w2c"))])  # world-to-camera
def test_wrong_pose_convention_in_a_fixture_is_caught(tmp_path, name, writer):
    truth = writer(tmp_path / name)
    m = _score(tmp_path, name, {"truth": TruthModel(truth)})["truth"]
    assert m["acc_median"] > 0.05 and m["pnp_rra_15"] < 1.0, m


def test_frame_selection_is_seeded_and_follows_the_window_rule():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = window_frames(30, 10, 4, rng)
        order = sorted(idx)
        assert len(set(idx)) == 10 and idx in (order, order[::-1])
        assert max(np.diff(order)) <= 4
    assert keyframes(12, 5) == [0, 5, 10]
    scenes = [BenchScene(f"s{i}", [BenchFrame(str(j), None) for j in range(40)])
              for i in range(3)]
    plan = sample_plan(scenes, "nrgbd", "window", 10, 8, seed=0)
    assert [key for _, key, _ in plan][:4] == ["nrgbd__s0__s000", "nrgbd__s1__s000",
                                               "nrgbd__s2__s000", "nrgbd__s0__s001"]
    assert plan == sample_plan(scenes, "nrgbd", "window", 10, 8, seed=0)
    assert [i for *_, i in plan] != [i for *_, i in sample_plan(scenes, "nrgbd", "window",
                                                                   10, 8, seed=1)]
    with pytest.raises(ValueError, match="at least 10 frames"):
        window_frames(5, 10, 4, rng)


def test_fast3r_and_student_through_the_same_interface(tmp_path):
    """The Fast3R path with the adapter tests' stand-in module, and a (random) tiny student."""
    from test_teachers import StandIn, stand_in_inference

    from distill3r.models.checkpoint import save_student
    from distill3r.models.student import build_student

    truth = WRITERS["demo"](tmp_path / "demo")
    save_student(build_student("tiny"), tmp_path / "student")
    stand_in = StandIn()
    models = {
        "fast3r": Fast3RModel(TeacherParams(name="fast3r", image_size=64, device="cpu",
                                            dtype="fp32"), stand_in, stand_in_inference,
                              "standin"),
        "student": StudentModel(tmp_path / "student", device="cpu", dtype="fp32"),
        "truth": TruthModel(truth)}
    res = _score(tmp_path, "demo", models, samples=1)
    assert stand_in.seen  # the adapter ran the stand-in
    for name in ("fast3r", "student"):
        assert np.isfinite(res[name]["acc_mean"]) and res[name]["seconds_per_scene"] > 0
        assert res[name]["peak_memory_mb"] > 0
    assert res["truth"]["acc_median"] < 1e-3  # the student's grid (multiple of 14) for all
    table = (tmp_path / "table.md").read_text()
    assert "| fast3r |" in table and "| student |" in table


def test_stage_skips_absent_roots_and_scores_the_demo(tmp_path):
    from stages.benchmark import main

    WRITERS["demo"](tmp_path / "demo")
    (tmp_path / "params.yaml").write_text(json.dumps({"benchmark": {
        "benchmarks": [{"name": "demo", "root": str(tmp_path / "demo"), "views": 3,
                        "samples": 2},
                       {"name": "sevenscenes", "root": None},
                       {"name": "dtu", "root": str(tmp_path / "absent")}],
        "models": ["groundtruth", "plane"], "long_side": 64}}))
    out, table = tmp_path / "benchmark.json", tmp_path / "benchmark.md"
    assert main(["--params", str(tmp_path / "params.yaml"), "--out", str(out),
                 "--table", str(table), "--run-ref", str(tmp_path / "no_run.json")]) == 0
    report = json.loads(out.read_text())
    assert set(report["skipped"]) == {"sevenscenes", "dtu"}
    assert "absent" in report["skipped"]["dtu"]
    assert report["results"]["demo"]["groundtruth"]["acc_median"] < 1e-3
    text = table.read_text()
    for published in ("1.58", "0.93", "3.4", "1.706", "96.2", "81.6", "75"):
        assert published in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"benchmark": {"benchmarks": [{"name": "scannet"}]}}))
    assert main(["--params", str(bad), "--out", str(out)]) == 1


@pytest.mark.slow  # ~10 s of it is MLflow creating its SQLite schema
def test_stage_logs_the_report_to_the_training_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from distill3r.tracking import start_run, write_run_ref
    from stages.benchmark import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run(Params(), uri, experiment="bench-test", run_name="train",
                   system_metrics=False) as run:
        ref = write_run_ref(tmp_path / "mlflow_run.json", run, uri)
    WRITERS["demo"](tmp_path / "demo")
    (tmp_path / "params.yaml").write_text(json.dumps({"benchmark": {
        "benchmarks": [{"name": "demo", "root": str(tmp_path / "demo"), "views": 3}],
        "models": ["groundtruth"], "long_side": 64}}))
    assert main(["--params", str(tmp_path / "params.yaml"), "--out",
                 str(tmp_path / "b.json"), "--run-ref", str(tmp_path / "mlflow_run.json")]) == 0
    metrics = MlflowClient(uri).get_run(ref.run_id).data.metrics
    assert metrics["benchmark.results.demo.groundtruth.acc_median"] < 1e-3
    assert "benchmark.results.demo.groundtruth.seconds_per_scene" in metrics


def test_readers_name_the_bad_file(tmp_path):
    from distill3r.benchmarks import readers

    write_nrgbd(tmp_path / "nrgbd", num_scenes=1, frames=3)
    poses = tmp_path / "nrgbd" / "scene0" / "poses.txt"
    poses.write_text("\n".join(poses.read_text().splitlines()[:5]))
    with pytest.raises(ValueError, match="poses.txt: 5 lines"):
        readers.nrgbd(tmp_path / "nrgbd")
    write_seven_scenes(tmp_path / "7s", num_scenes=1, frames=3)
    (tmp_path / "7s" / "room0" / "seq-01" / "frame-000001.pose.txt").write_text("1 2 3\n")
    scene = readers.seven_scenes(tmp_path / "7s")[0]
    with pytest.raises(ValueError, match="frame-000001.pose.txt"):
        scene.frames[1].load()
    (tmp_path / "7s" / "room0" / "TestSplit.txt").unlink()
    with pytest.raises(ValueError, match="TestSplit.txt: split file not found"):
        readers.seven_scenes(tmp_path / "7s")
