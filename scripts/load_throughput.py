"""Demo training throughput on this machine, alone and beside one competing CPU-bound process.

    python scripts/load_throughput.py [--steps 60] [--scenes 8] [--threads N] [--workdir DIR] \
        [--json OUT]

Builds a small demo cache with the real stages (render_demo, manifest, cache; the demo profile
of ``params.yaml`` with ``--scenes`` scenes), then runs the real train stage twice for
``--steps`` optimiser steps: once alone and once while ``python -c "while True: pass"`` runs.
Throughput is the median of the ``samples/s`` the train stage prints (first print skipped:
warm-up). Prints both figures, their ratio, and the load average before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"\[train\] step (\d+)/\d+ .*samples_per_s=([0-9.eE+-]+)")


def _stage(name: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "stages" / f"{name}.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def _params(work: Path, scenes: int, steps: int, threads: int | None) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["demo"].update(num_scenes=scenes, workers=0)
    raw["data"]["sources"] = [{"kind": "demo", "root": str(work / "raw"), "name": None,
                               "sample_frac": 1.0, "options": {}}]
    raw["train"].update(max_steps=steps, val_every_steps=10 * steps,
                        checkpoint_every_steps=10 * steps, system_metrics=False,
                        tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    raw["runtime"]["threads"] = threads
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _train_throughput(params: Path, work: Path, tag: str, env: dict) -> tuple[float, int]:
    proc = _stage("train", "--params", params, "--cache", work / "cache", "--out",
                  work / f"student-{tag}", "--checkpoints", work / f"ckpt-{tag}",
                  "--no-progress", env=env)
    rates = [float(m.group(2)) for m in STEP_LINE.finditer(proc.stdout)]
    threads = re.search(r"(\d+) torch thread", proc.stderr + proc.stdout)
    if len(rates) < 2:
        raise SystemExit(f"train printed too few step lines:\n{proc.stdout[-2000:]}")
    return statistics.median(rates[1:]), int(threads.group(1)) if threads else -1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per run")
    p.add_argument("--scenes", type=int, default=8, help="demo scenes in the cache")
    p.add_argument("--workdir", help="keep the cache and runs here (default: a temp folder)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, help="runtime.threads for both runs (default: the "
                   "params.yaml value)")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        threads = args.threads or yaml.safe_load((ROOT / "params.yaml").read_text())[
            "runtime"]["threads"]
        params = _params(work, args.scenes, args.steps, threads)
        if not (work / "cache" / "train" / "index.json").is_file():
            _stage("render_demo", "--params", params, "--out", work / "raw", "--no-progress",
                   env=env)
            _stage("manifest", "--params", params, "--out", work / "manifest.csv",
                   "--images-dir", work / "images", "--no-progress", env=env)
            _stage("cache", "--params", params, "--manifest", work / "manifest.csv", "--out",
                   work / "cache", "--no-progress", env=env)
        figures = {"cores": len(os.sched_getaffinity(0)), "steps": args.steps}
        figures["load_before_alone"] = os.getloadavg()
        figures["alone"], figures["threads_alone"] = _train_throughput(params, work, "alone", env)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            figures["load_before_loaded"] = os.getloadavg()
            figures["loaded"], figures["threads_loaded"] = _train_throughput(params, work,
                                                                             "loaded", env)
        finally:
            hog.kill()
            hog.wait()
    figures["ratio"] = figures["loaded"] / figures["alone"]
    print(f"demo training: alone {figures['alone']:.2f} samples/s ({figures['threads_alone']} "
          f"thread(s)), with one competing process {figures['loaded']:.2f} samples/s "
          f"({figures['threads_loaded']} thread(s)): {100 * figures['ratio']:.0f}% of alone")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
