"""`dvc plots show` with the offline template renders the curves in headless Chromium with every
host unresolvable (no CDN, no network). Needs npm (the vega scripts come from the npm registry)
and Debian's chromium (`.ci/run` installs it); skipped where either is missing outside CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from distill3r.plots import write_offline_template

DVC = Path(sys.executable).parent / "dvc"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]

needs_tools = pytest.mark.skipif(
    (CHROMIUM is None or shutil.which("npm") is None) and not os.environ.get("CI"),
    reason="needs chromium and npm")


def screenshot(page: Path, out: Path) -> np.ndarray:
    """A PNG of ``page`` rendered by headless Chromium with all host names unresolvable."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={out.parent / 'chromium-profile'}",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000",
           "--window-size=900,500", f"--screenshot={out}", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    image = cv2.imread(str(out))
    assert image is not None, "chromium wrote no screenshot"
    return image


@needs_tools
def test_offline_plot_page_draws_the_curve(tmp_path):
    template = write_offline_template(tmp_path / "cache", tmp_path / "plots.html")
    assert "cdn.jsdelivr" not in template.read_text()
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".dvc").mkdir()  # a DVC repository without git
    subprocess.run([DVC, "init", "--no-scm", "-f"], cwd=repo, check=True, capture_output=True)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    steps = np.arange(0, 200, 10)
    rows = "\n".join(f"{s},{5.0 * np.exp(-s / 40) + 0.1:.5f}" for s in steps)
    (repo / "curve.csv").write_text("step,loss\n" + rows + "\n")
    for name, template_name in (("linear", "linear"), ("log", "log_loss")):
        out = repo / f"out-{name}"
        done = subprocess.run([DVC, "plots", "show", "curve.csv", "-x", "step", "-y", "loss",
                               "--template", template_name, "--html-template", str(template),
                               "-o", str(out)], cwd=repo, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        html = (out / "index.html").read_text()
        assert "cdn.jsdelivr" not in html and "vegaEmbed" in html
        image = screenshot(out / "index.html", tmp_path / f"{name}.png")
        # the line is drawn in vega's first category colour (#4c78a8 / purple tones): count
        # strongly coloured pixels, which a page without its scripts never has
        b, g, r = (image[..., i].astype(int) for i in range(3))
        coloured = (np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)) > 60
        assert coloured.sum() > 300, (name, int(coloured.sum()))
