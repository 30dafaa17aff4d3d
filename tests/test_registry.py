"""Registered students: MLflow's model registry (a real SQLite store) finds the version of a run
with its tags and the evaluation's metrics, and `dvc artifacts get` (real git and DVC, a local
remote) retrieves the project's declared `student` artifact in a fresh clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from distill3r.registry import register_student, tag_run_versions, versions_of_run
from distill3r.tracking import RunRef, log_artifacts_dir, start_run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@lab", "GIT_COMMITTER_NAME": "a",
       "GIT_COMMITTER_EMAIL": "a@lab", "DVC_NO_ANALYTICS": "1",
       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _student(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(2048))
    (folder / "config.json").write_text('{"name": "tiny"}\n')
    return folder


def test_registered_version_has_the_run_tags_and_eval_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    student = _student(tmp_path / "student")
    with start_run(None, uri, system_metrics=False) as run:
        log_artifacts_dir(student, "student")
    run_id = run.info.run_id
    v1 = register_student(uri, run_id, "distill3r-student", {"cache.fingerprint": "abc"})
    v2 = register_student(uri, run_id, "distill3r-student")  # the name exists: a new version
    assert (v1, v2) == ("1", "2")
    ref = RunRef(run_id, run.info.experiment_id, uri)
    assert sorted(tag_run_versions(ref, {"abs_rel": 0.15, "maa30": None})) == \
        ["distill3r-student/1", "distill3r-student/2"]
    client = mlflow.tracking.MlflowClient(uri)
    mv = client.get_model_version("distill3r-student", "1")
    assert mv.run_id == run_id and mv.source == f"runs:/{run_id}/student"
    assert mv.tags == {"run_id": run_id, "cache.fingerprint": "abc", "eval.abs_rel": "0.15"}
    assert sorted(str(v.version) for v in versions_of_run(uri, run_id)) == ["1", "2"]
    mlflow.set_tracking_uri(uri)
    got = Path(mlflow.artifacts.download_artifacts("models:/distill3r-student/1",
                                                   dst_path=str(tmp_path / "got")))
    assert (got / "model.safetensors").read_bytes() == \
        (student / "model.safetensors").read_bytes()
    # an unreachable store only warns
    assert tag_run_versions(RunRef(run_id, "0", "sqlite:////nonexistent/dir/x.db"),
                            {"abs_rel": 1.0}) == []


def _git_dvc(cmd: list, cwd: Path) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=dict(os.environ, **ENV),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.mark.slow
def test_dvc_artifacts_get_retrieves_the_student_in_a_fresh_clone(tmp_path):
    a, b, remote = tmp_path / "a", tmp_path / "b", tmp_path / "remote"
    a.mkdir()
    # the project's artifact declaration, over a student tracked as that path
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
    assert declared["student"]["type"] == "model"
    (a / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": declared}))
    student = _student(a / declared["student"]["path"])
    _git_dvc(["git", "init", "-q", "-b", "main"], a)
    _git_dvc(["dvc", "init", "-q"], a)
    _git_dvc(["dvc", "remote", "add", "-d", "local", remote], a)
    _git_dvc(["dvc", "add", "-q", student.relative_to(a)], a)
    _git_dvc(["git", "add", "-A"], a)
    _git_dvc(["git", "commit", "-q", "-m", "student"], a)
    # a version of the artifact is a Git tag in GTO's format (what `gto register` writes)
    _git_dvc(["git", "tag", "-a", "student@v0.1.0", "-m", "student v0.1.0"], a)
    _git_dvc(["dvc", "push", "-q"], a)
    _git_dvc(["git", "clone", "-q", a, b], tmp_path)
    assert not (b / "models" / "student" / "model.safetensors").exists()
    _git_dvc(["dvc", "artifacts", "get", ".", "student", "-o", "got"], b)
    assert (b / "got" / "model.safetensors").read_bytes() == \
        (student / "model.safetensors").read_bytes()
    shutil.rmtree(a / ".dvc" / "cache")  # the remote alone serves another clone's get
    _git_dvc(["dvc", "artifacts", "get", str(a), "student", "--rev", "v0.1.0",
              "-o", tmp_path / "got2"], tmp_path)
    assert (tmp_path / "got2" / "config.json").is_file()
