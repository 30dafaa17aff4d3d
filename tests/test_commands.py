"""The ``distill3r`` console command dispatches to the command modules the stages also run."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill3r.commands import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "distill3r", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_help_lists_every_command_and_loads_no_torch():
    proc = _run("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout
    code = "import sys; from distill3r.commands import _parser; _parser(); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert out.stdout.strip() == "False"


def test_unknown_command_and_version():
    proc = _run("nope")
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("distill3r ")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_module_has_main_and_usage_names_the_command(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.main)
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: distill3r {name} ")


def test_console_script_entry_point_resolves():
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = target["distill3r"].split(":")
    assert getattr(importlib.import_module(module), func) is main


def test_stage_script_runs_the_command_main():
    source = (ROOT / "stages" / "infer.py").read_text()
    assert "from distill3r.commands.infer import main" in source
