"""The lab workflow with real DVC, git and MLflow: member A runs the whole pipeline (tiny params)
and pushes; member B clones, pulls, finds everything up to date (nothing reruns) and sees A's
MLflow run with its artifacts; retraining from the same cache gives the same weights."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill3r.tracking import read_run_ref

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@lab", "GIT_COMMITTER_NAME": "a",
       "GIT_COMMITTER_EMAIL": "a@lab", "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": "",
       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
TINY = {
    "demo": {"num_scenes": 14, "views_per_scene": 3, "height": 56, "width": 56, "workers": 0},
    "cache": {"image_size": [28, 28], "views_per_sample": 2, "max_samples_per_scene": 1},
    "train": {"max_steps": 2, "val_every_steps": 2, "checkpoint_every_steps": 2,
              "log_every_steps": 1, "batch_size": 2, "system_metrics": False},
    "runtime": {"threads": 1},
    "eval": {"max_samples": 2, "device": "cpu"},
    "infer": {"size": 28, "device": "cpu", "preview_views": 1},
    "bench": {"models": ["tiny"], "reference": "tiny", "views": [2], "image_size": [28, 28],
              "repeats": 1, "warmup": 0, "device": "cpu"},
    "benchmark": {"long_side": 28, "max_scenes": 1, "device": "cpu"},
}


def run(cmd: list, cwd: Path) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=dict(os.environ, **ENV),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _project_copy(dest: Path) -> None:
    """The project's files as a user's checkout holds them (tracked and new, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not name.startswith(("tests/", "external/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)  # member A starts a new pipeline


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_clone_pull_is_up_to_date_and_shows_the_run(tmp_path):
    a, b, remote = tmp_path / "a", tmp_path / "b", tmp_path / "remote"
    store = f"sqlite:///{tmp_path / 'lab-mlflow' / 'mlflow.db'}"  # the lab's shared store
    a.mkdir()
    (tmp_path / "lab-mlflow").mkdir()
    _project_copy(a)
    params = yaml.safe_load((a / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["train"]["tracking_uri"] = store
    params["benchmark"]["benchmarks"][0]["views"] = 3
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], a)
    run(["dvc", "remote", "add", "-d", "-f", "local", remote], a)
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-q", "-m", "tiny lab pipeline"], a)

    run(["dvc", "repro"], a)
    run(["dvc", "push"], a)
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-q", "-m", "pipeline results"], a)
    assert run(["git", "status", "--porcelain"], a).strip() == ""

    run(["git", "clone", "-q", a, b], tmp_path)
    run(["dvc", "pull"], b)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], b)
    repro = run(["dvc", "repro"], b)
    assert "Running stage" not in repro, repro
    for stage in ("render_demo", "manifest", "cache", "train", "evaluate", "infer", "bench",
                  "benchmark"):
        assert f"Stage '{stage}' didn't change, skipping" in repro, stage

    ref = read_run_ref(b / "reports" / "mlflow_run.json")
    assert ref.tracking_uri == store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    got = client.get_run(ref.run_id)
    assert got.info.run_name == "train tiny-pyramid-local 2 steps"
    assert got.info.status == "FINISHED"
    assert "eval.student.chamfer" in got.data.metrics  # the evaluate stage's metrics too
    assert {x.path for x in client.list_artifacts(ref.run_id, "student")} == \
        {"student/model.safetensors", "student/config.json"}

    # retraining from the pulled cache reproduces the pushed weights bit for bit
    weights = b / "models" / "student" / "model.safetensors"
    pushed = _sha(weights)
    run(["dvc", "repro", "--force", "--single-item", "train"], b)
    assert _sha(weights) == pushed
    assert "Data and pipelines are up to date" in run(["dvc", "status"], b)
