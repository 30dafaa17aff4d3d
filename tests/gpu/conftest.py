"""CUDA tests: skipped without a CUDA device; every test here is marked ``gpu``.

Run them alone with ``make test-gpu`` (``pytest tests/gpu``); figures they measure are printed
(``-s``) and written to ``$GPU_REPORT_DIR`` when that is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture
def report():
    """``report(name, figures)``: print a figure dict and keep it under ``$GPU_REPORT_DIR``."""
    def write(name: str, figures: dict) -> None:
        print(f"{name}: {json.dumps(figures)}")
        folder = os.environ.get("GPU_REPORT_DIR")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{name}.json").write_text(json.dumps(figures, indent=2))
    return write
