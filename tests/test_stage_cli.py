"""Every stage script behaves the same: ``--no-progress``, whole-file params validation before
any work, and bad input as ``<stage>: error: <message>`` (exit 1, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the arguments each stage requires (never reached: the params fail first)
ARGS = {
    "render_demo": ["--out", "x"],
    "manifest": ["--out", "x.csv", "--images-dir", "x"],
    "cache": ["--manifest", "x.csv", "--out", "x"],
    "train": ["--cache", "x", "--out", "x", "--checkpoints", "x"],
    "evaluate": ["--checkpoint", "x", "--cache", "x", "--out", "x.json"],
    "infer": ["x", "--checkpoint", "x", "--output-dir", "x"],
    "bench": ["--out", "x.json", "--plot", "x.png"],
    "benchmark": ["--out", "x.json"],
    "study_table": ["--teacher-eval", "x", "--student-eval", "x", "--agreement-eval", "x",
                    "--teacher-train", "x", "--student-train", "x", "--out", "x",
                    "--table", "x.md", "--plot", "x.csv"],
}


def _run(stage: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


# scripts that are no DVC stage and read no params (stages/view.py: the viewer of infer outputs)
NO_PARAMS = {"view"}


def test_every_stage_script_is_listed():
    assert {p.stem for p in (ROOT / "stages").glob("*.py")} == set(ARGS) | NO_PARAMS


def test_viewer_bad_input_is_an_error_not_a_traceback(tmp_path):
    proc = _run("view", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"view: error: {tmp_path / 'nope'}: neither an infer output "
                                  "folder"), proc.stderr


@pytest.mark.parametrize("stage", sorted(ARGS))
def test_typo_in_any_section_stops_every_stage_before_work(stage, tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["loss"]["weighting"] = "teachr"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    proc = _run(stage, "--params", str(params), "--no-progress", *ARGS[stage], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"{stage}: error: {params}: "), proc.stderr
    assert "loss.weighting: 'teachr' is not one of 'teacher', 'none', 'student'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_missing_params_file_is_an_error_not_a_traceback(tmp_path):
    proc = _run("bench", "--params", str(tmp_path / "nope.yaml"), *ARGS["bench"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"bench: error: {tmp_path / 'nope.yaml'}: params file not found"


@pytest.mark.parametrize("stage", sorted(ARGS) + sorted(NO_PARAMS))
def test_a_copy_of_the_repository_runs_its_own_package(stage, tmp_path):
    """A queued ``dvc exp run`` runs the stages in a copy of the repository while the venv's
    editable install points at the original: each stage must import the copy's package."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "stages", copy / "stages")
    shutil.copytree(ROOT / "distill3r", copy / "distill3r",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "distill3r" / "__init__.py"
    init.write_text(init.read_text() + "\nraise SystemExit('the copy was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(copy / "stages" / f"{stage}.py"), "--help"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1 and "the copy was imported" in proc.stderr, proc.stderr[-500:]
