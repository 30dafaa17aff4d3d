"""Training runs as tracked experiments: a real MLflow server, and real `dvc exp run`s (in the
workspace and through the queue) that each become one MLflow run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill3r.models import load_student
from distill3r.training.run import train
from services import mlflow_server
from tracking_helpers import download_artifacts
from training_helpers import (TRAIN_SCRIPT, build_tiny_cache, quiet_env, tiny_params,
                              write_params)

GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
           "DVC_NO_ANALYTICS": "1"}
BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("restore_torch_threads")


@pytest.mark.slow
def test_mlflow_server_gets_params_metrics_and_weights_that_reload_identically(tmp_path):
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path / "server") as uri:
        params = tiny_params(uri, max_steps=2, val_every_steps=1, checkpoint_every_steps=100)
        cache = build_tiny_cache(tmp_path, params)
        result = train(params, cache, tmp_path / "student", tmp_path / "ckpt")
        client = MlflowClient(uri)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["train.max_steps"] == "2" and run.data.params["model.name"] == \
            params.model.name and run.data.params["loss.alpha_global"] == "2.0"
        assert {m.step for m in client.get_metric_history(result.run_id, "val/loss")} == {0, 1, 2}
        assert len(client.get_metric_history(result.run_id, "train/loss")) == 2
        local = download_artifacts(result.run_id, "student", tmp_path / "download", uri)
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_student(local)
    images = torch.rand(1, 3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = result.student(images), loaded(images)
    for key in ("xyz_global", "conf_global", "xyz_local", "conf_local"):
        assert torch.equal(want[key], got[key]), key


def _run(cmd: list, cwd: Path, timeout: float = 180) -> str:
    env = quiet_env(**GIT_ENV, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


DVC_YAML = """\
stages:
  train:
    cmd: python stages/train.py --params params.yaml --cache data/cache --out models/student
      --checkpoints checkpoints --run-ref reports/mlflow_run.json
      --plots reports/train_curve.csv --metrics reports/train.json
    deps: [stages/train.py, data/cache]
    params: [model, loss, train]
    outs: [models/student, {reports/mlflow_run.json: {cache: false}}]
    metrics: [{reports/train.json: {cache: false}}]
    plots: [{reports/train_curve.csv: {cache: false, x: step, y: loss}}]
"""


@pytest.mark.slow
def test_dvc_experiments_in_workspace_and_queue_become_runs_differing_only_in_lr(tmp_path):
    from mlflow.tracking import MlflowClient

    repo = tmp_path / "repo"
    params = tiny_params(None, max_steps=2, val_every_steps=100, checkpoint_every_steps=100,
                         lr=1e-4)
    cache = build_tiny_cache(tmp_path, params)
    (repo / "data").mkdir(parents=True)
    shutil.move(cache, repo / "data" / "cache")
    (repo / "stages").mkdir()
    shutil.copy(TRAIN_SCRIPT, repo / "stages" / "train.py")
    write_params(params, repo / "params.yaml")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n/checkpoints/\n")
    _run(["git", "init", "-q", "-b", "main"], repo)
    _run([BIN / "dvc", "init", "-q"], repo)
    _run([BIN / "dvc", "add", "-q", "data/cache"], repo)  # a queued run checks it out
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "pipeline"], repo)

    _run([BIN / "dvc", "exp", "run", "-n", "lr-a", "-S", "train.lr=0.0002"], repo)
    _run([BIN / "dvc", "exp", "run", "--queue", "-n", "lr-b", "-S", "train.lr=0.0003"], repo)
    _run([BIN / "dvc", "queue", "start"], repo)
    try:
        deadline = time.monotonic() + 150
        while True:  # the queue worker runs the experiment in a temporary copy of the repo
            status = _run([BIN / "dvc", "queue", "status"], repo)
            if "lr-b" in status and not any(s in status for s in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, status
            time.sleep(1.0)
        assert "Success" in status, status + _run([BIN / "dvc", "queue", "logs", "lr-b"], repo)
    finally:  # no queue worker outlives the test, even when it failed
        subprocess.run([BIN / "dvc", "queue", "stop", "--kill"], cwd=repo, timeout=60,
                       capture_output=True, env=quiet_env(**GIT_ENV))

    uri = f"sqlite:///{repo.resolve() / 'mlflow.db'}"  # the default store, also for the queue
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.train.experiment)
    runs = {r.data.tags["dvc.exp_name"]: r for r in client.search_runs(
        [experiment.experiment_id])}
    assert sorted(runs) == ["lr-a", "lr-b"]
    a, b = runs["lr-a"].data.params, runs["lr-b"].data.params
    assert set(a) == set(b) and len(a) > 50
    assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {"train.lr": ("0.0002", "0.0003")}
    assert a["train.tracking_uri"] == "null"  # run-specific values stay out of params
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags["dvc.stage"] == "train"
        assert run.data.tags["cache.fingerprint"] == runs["lr-a"].data.tags["cache.fingerprint"]
        assert [f.path for f in client.list_artifacts(run.info.run_id, "student")] == \
            ["student/config.json", "student/model.safetensors"]
    shown = _run([BIN / "dvc", "exp", "show", "--csv", "--no-pager"], repo)
    assert "lr-a" in shown and "lr-b" in shown and "final_val.loss" in shown
