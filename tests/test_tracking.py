"""MLflow tracking against a real MLflow server on 127.0.0.1 (and a real `dvc exp run`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distill3r.config import Params
from distill3r.tracking import (
    dvc_tags,
    flatten_params,
    git_tags,
    log_artifacts_dir,
    log_metrics,
    make_lightning_logger,
    read_run_ref,
    resolve_tracking_uri,
    sqlite_artifact_location,
    start_run,
    write_run_ref,
)
from services import mlflow_server
from tracking_helpers import download_artifacts, find_run

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "DVC_NO_ANALYTICS": "1",
}


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=dict(os.environ, **GIT_ENV, **(env or {})),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


def git_repo(path: Path) -> Path:
    """A git repository with one commit."""
    path.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q", "-b", "main"], path)
    (path / "tracked.txt").write_text("v1\n")
    run(["git", "add", "tracked.txt"], path)
    run(["git", "commit", "-q", "-m", "init"], path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(server)


@pytest.mark.slow  # starts an MLflow server
def test_run_roundtrip_on_server(server, client, tmp_path):
    repo = git_repo(tmp_path / "repo")
    commit = run(["git", "rev-parse", "HEAD"], repo).strip()
    artifacts = tmp_path / "student"
    (artifacts / "sub").mkdir(parents=True)
    (artifacts / "config.json").write_text('{"name": "tiny"}\n')
    (artifacts / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    params = Params()
    params.train.lr = 3e-4

    with start_run(
        params, server, experiment="roundtrip", run_name="r1",
        tags={"cache.fingerprint": "fp-123"}, system_metrics=True,
        system_metrics_interval=0.2, repo_root=repo,
    ) as active:  # fmt: skip
        for step in range(3):
            log_metrics({"train/loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
        log_artifacts_dir(artifacts, "student")
        # The system-metrics thread logs its first sample about one interval after the start.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            metrics = client.get_run(active.info.run_id).data.metrics
            if "system/cpu_utilization_percentage" in metrics:
                break
            time.sleep(0.2)
        ref = write_run_ref(tmp_path / "reports" / "mlflow_run.json", active)
    run_id = active.info.run_id

    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "r1"
    assert client.get_experiment(got.info.experiment_id).name == "roundtrip"
    assert got.data.params == flatten_params(params)
    assert got.data.params["train.lr"] == "0.0003"
    assert got.data.params["train.betas"] == "[0.9, 0.95]"
    assert got.data.params["model.encoder_weights"] == "null"
    assert got.data.params["data.sources"].startswith('[{"kind": "demo"')
    assert got.data.tags["mlflow.source.git.commit"] == commit
    assert "git.commit" not in got.data.tags  # no second copy of MLflow's own tag
    experiment = client.get_experiment(got.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert got.data.tags["git.dirty"] == "false"
    assert got.data.tags["cache.fingerprint"] == "fp-123"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3)),
    ]  # fmt: skip
    system = {k for k in got.data.metrics if k.startswith("system/")}
    assert "system/cpu_utilization_percentage" in system
    assert "system/system_memory_usage_megabytes" in system

    # Artifacts come back byte-identical through the server's artifact proxy.
    local = download_artifacts(run_id, "student", tmp_path / "download", server)
    for src in (artifacts / "config.json", artifacts / "sub" / "weights.bin"):
        assert (local / src.relative_to(artifacts)).read_bytes() == src.read_bytes()

    # A later stage reopens the run from the reference file and adds metrics.
    assert read_run_ref(tmp_path / "reports" / "mlflow_run.json") == ref
    assert ref.run_id == run_id and ref.tracking_uri == server
    with start_run(None, ref.tracking_uri, run_id=ref.run_id, system_metrics=False):
        log_metrics({"eval/abs_rel": 0.1})
    again = client.get_run(run_id)
    assert again.data.metrics["eval/abs_rel"] == pytest.approx(0.1)
    assert again.data.params == got.data.params
    assert find_run(server, "roundtrip", tags={"cache.fingerprint": "fp-123"}).info.run_id == run_id
    assert find_run(server, "roundtrip", tags={"cache.fingerprint": "other"}) is None
    assert find_run(server, "no-such-experiment") is None


def test_failed_body_marks_run_failed(server, client):
    with pytest.raises(RuntimeError, match="boom"):
        with start_run({"a": {"b": 1}}, server, experiment="failing", system_metrics=False) as act:
            raise RuntimeError("boom")
    got = client.get_run(act.info.run_id)
    assert got.info.status == "FAILED"
    assert got.data.params == {"a.b": "1"}


def test_changed_param_value_is_rejected(server):
    from mlflow.exceptions import MlflowException

    with start_run({"x": 1}, server, experiment="params", system_metrics=False) as active:
        pass
    with pytest.raises(MlflowException):
        with start_run({"x": 2}, server, run_id=active.info.run_id, system_metrics=False):
            pass


def test_reopened_run_keeps_the_creators_tags(server, client, monkeypatch):
    with start_run({"x": 1}, server, experiment="reopen", system_metrics=False,
                   tags={"stage": "train"}) as active:
        pass
    created = client.get_run(active.info.run_id).data.tags
    monkeypatch.setenv("DVC_STAGE", "evaluate")
    with start_run(None, server, run_id=active.info.run_id, system_metrics=False,
                   tags={"evaluated": "yes"}):
        pass
    tags = client.get_run(active.info.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == created["mlflow.source.git.commit"] and tags["stage"] == "train"
    assert tags["evaluated"] == "yes" and "dvc.stage" not in tags


def test_lightning_logger_writes_into_existing_run(server, client):
    with start_run({"m": 1}, server, experiment="lightning", system_metrics=False) as active:
        logger = make_lightning_logger(server, "lightning", active.info.run_id)
        assert logger.run_id == active.info.run_id
        logger.log_metrics({"train/loss": 0.25}, step=7)
    history = client.get_metric_history(active.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(7, 0.25)]
    with pytest.raises(ValueError, match="tracking_uri"):
        make_lightning_logger("", "lightning", active.info.run_id)


def test_sqlite_store_keeps_artifacts_next_to_the_database(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # e.g. a queued `dvc exp run` in a temporary copy
    (elsewhere / "out").mkdir()
    (elsewhere / "out" / "a.txt").write_text("artifact")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with start_run({"p": 1}, uri, experiment="sqlite", system_metrics=False) as active:
        log_artifacts_dir(elsewhere / "out", "out")
    exp = MlflowClient(uri).get_experiment(active.info.experiment_id)
    assert exp.artifact_location == (store / "mlruns").as_uri()
    assert [p.read_text() for p in (store / "mlruns").rglob("a.txt")] == ["artifact"]
    assert not (elsewhere / "mlruns").exists()
    with pytest.raises(ValueError, match="artifact folder not found"):
        with start_run(None, uri, run_id=active.info.run_id, system_metrics=False):
            log_artifacts_dir(elsewhere / "missing")
    assert sqlite_artifact_location("http://127.0.0.1:5000") is None
    assert sqlite_artifact_location("sqlite:///rel/m.db") == (elsewhere / "rel" / "mlruns").as_uri()


def test_null_run_ref_means_the_store_of_the_dvc_root_under_dvc(tmp_path, monkeypatch):
    """A queued experiment runs in a temporary copy: its stages' run reference (written as
    null for the main repository's store) must lead back to the main store, not the copy's."""
    import json

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    main, copy = tmp_path / "main", tmp_path / "main" / ".dvc" / "tmp" / "exps" / "tmp1"
    for repo in (main, copy):
        (repo / ".dvc").mkdir(parents=True)
    path = copy / "reports" / "run.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"run_id": "r", "experiment_id": "1", "tracking_uri": None}))
    assert read_run_ref(path).tracking_uri == f"sqlite:///{copy.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(main))
    assert read_run_ref(path).tracking_uri == f"sqlite:///{main.resolve() / 'mlflow.db'}"


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = tmp_path / "repo"
    expected_default = f"sqlite:///{root.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri(None, root) == expected_default
    assert resolve_tracking_uri("", root) == expected_default
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert resolve_tracking_uri(None) == expected_default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None, root) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("http://param:5000", root) == "http://param:5000"


def test_flatten_params_limits_and_errors():
    flat = flatten_params({"a": {"long": "x" * 10000, "flag": True, "n": None}})
    assert flat == {"a.long": "x" * 6000, "a.flag": "true", "a.n": "null"}
    with pytest.raises(ValueError, match="dataclass or a mapping"):
        flatten_params([1, 2])
    with pytest.raises(ValueError, match="param name"):
        flatten_params({"k" * 300: 1})


def test_git_tags_dirty_flag_and_outside_repo(tmp_path):
    repo = git_repo(tmp_path / "repo")
    assert git_tags(repo)["git.dirty"] == "false"
    (repo / "untracked.txt").write_text("x")
    assert git_tags(repo)["git.dirty"] == "false"
    (repo / "tracked.txt").write_text("v2\n")
    tags = git_tags(repo)
    assert tags["git.dirty"] == "true"
    assert len(tags["mlflow.source.git.commit"]) == 40
    (tmp_path / "plain").mkdir()
    assert git_tags(tmp_path / "plain") == {}


def test_read_run_ref_errors_name_the_file(tmp_path):
    path = tmp_path / "mlflow_run.json"
    with pytest.raises(ValueError, match="mlflow_run.json.*not found"):
        read_run_ref(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="mlflow_run.json: not valid JSON"):
        read_run_ref(path)
    path.write_text(json.dumps({"run_id": "abc", "tracking_uri": "sqlite:///x.db"}))
    with pytest.raises(ValueError, match="mlflow_run.json: missing key.*experiment_id"):
        read_run_ref(path)
    path.write_text(json.dumps({"run_id": "", "experiment_id": "1", "tracking_uri": "u"}))
    with pytest.raises(ValueError, match="run_id must be a non-empty string"):
        read_run_ref(path)


@pytest.mark.slow
def test_dvc_exp_run_tags_and_default_sqlite_store(tmp_path):
    """Under a real `dvc exp run`, a stage logs to <repo>/mlflow.db with the experiment name."""
    repo = git_repo(tmp_path / "repo")
    dvc = Path(sys.executable).parent / "dvc"
    run([dvc, "init", "-q"], repo)
    (repo / "params.yaml").write_text("train:\n  lr: 0.001\n")
    (repo / "log_run.py").write_text(textwrap.dedent("""\
        import yaml
        from distill3r.tracking import resolve_tracking_uri, start_run, write_run_ref
        params = yaml.safe_load(open("params.yaml"))
        uri = resolve_tracking_uri(None)
        with start_run(params, uri, experiment="exp", system_metrics=False) as run:
            write_run_ref("mlflow_run.json", run, uri)
        """))  # fmt: skip
    (repo / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          train:
            cmd: {sys.executable} log_run.py
            deps: [log_run.py]
            params: [train.lr]
            outs: [{{mlflow_run.json: {{cache: false}}}}]
        """))  # fmt: skip
    (repo / ".gitignore").write_text("mlflow.db\n")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "pipeline"], repo)
    env = {"MLFLOW_TRACKING_URI": ""}
    run([dvc, "exp", "run", "-q", "-n", "lr-try", "-S", "train.lr=0.01"], repo, env)

    ref = read_run_ref(repo / "mlflow_run.json")
    assert ref.tracking_uri == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    got = MlflowClient(ref.tracking_uri).get_run(ref.run_id)
    assert got.data.params == {"train.lr": "0.01"}
    assert got.data.tags["dvc.exp_name"] == "lr-try"
    assert got.data.tags["dvc.stage"] == "train"
    baseline = run(["git", "rev-parse", "HEAD"], repo).strip()
    assert got.data.tags["dvc.exp_baseline_rev"] == baseline
    assert got.data.tags["git.dirty"] == "true"  # params.yaml was changed by -S
    assert dvc_tags({}) == {}


def test_run_ref_of_the_repository_store_travels_with_the_repository(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from distill3r.tracking import default_store_uri

    repo = tmp_path / "a"
    (repo / ".dvc").mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    run = SimpleNamespace(info=SimpleNamespace(run_id="r1", experiment_id="1", run_name="x"))
    write_run_ref(repo / "reports" / "mlflow_run.json", run, default_store_uri())
    assert json.loads((repo / "reports" / "mlflow_run.json").read_text())["tracking_uri"] is None
    moved = tmp_path / "b"
    repo.rename(moved)
    monkeypatch.delenv("DVC_ROOT")
    ref = read_run_ref(moved / "reports" / "mlflow_run.json")
    assert ref.tracking_uri == f"sqlite:///{moved.resolve() / 'mlflow.db'}"
    # a store outside the repository (a lab server) is kept as it is
    write_run_ref(moved / "ref.json", run, "http://mlflow.lab:5000")
    assert read_run_ref(moved / "ref.json").tracking_uri == "http://mlflow.lab:5000"


@pytest.mark.slow
def test_moved_repository_store_keeps_its_artifacts(tmp_path):
    """A repository copied elsewhere writes and finds artifacts in its own mlruns/, not the
    original's (MLflow stores absolute artifact URIs)."""
    from mlflow.tracking import MlflowClient

    old = tmp_path / "old"
    old.mkdir()
    (tmp_path / "a.txt").write_text("artifact")
    uri = f"sqlite:///{old / 'mlflow.db'}"
    with start_run(None, uri, experiment="moves", system_metrics=False) as run:
        import mlflow

        mlflow.log_artifact(str(tmp_path / "a.txt"))
        first = run.info.run_id
    new = tmp_path / "new"
    shutil.copytree(old, new)
    shutil.rmtree(old)
    new_uri = f"sqlite:///{new / 'mlflow.db'}"
    with start_run(None, new_uri, experiment="moves", system_metrics=False) as run:
        second = run.info.run_id
    client = MlflowClient(new_uri)
    for run_id in (first, second):
        assert client.get_run(run_id).info.artifact_uri.startswith((new / "mlruns").as_uri())
    assert [a.path for a in client.list_artifacts(first)] == ["a.txt"]
    assert not old.exists()
