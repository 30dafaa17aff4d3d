"""Shared fixtures of the training tests: a tiny teacher cache and tiny training params.

The cache is real: analytic box-room scenes (``boxroom.py``) -> manifest -> the cache writer
with the ground-truth teacher, at 56x56 with 3 views per sample (a few seconds).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import yaml

from boxroom import make_box_room_manifest
from distill3r.cache.writer import build_cache
from distill3r.config import Params, load_params, to_dict

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "stages" / "train.py"
SIZE = 56


def tiny_params(tracking_uri: str | None = None, **train) -> Params:
    """The repository's params shrunk for tests: 56x56, 3 views, batch 2, CPU, fp32 (bf16 on
    small CPU batches gains nothing), no workers and no system metrics; ``train`` overrides."""
    params = load_params(REPO / "params.yaml")
    cache = dataclasses.replace(params.cache, image_size=[SIZE, SIZE], views_per_sample=3,
                                max_samples_per_scene=3, shard_max_samples=4)
    settings = dict(accelerator="cpu", devices=1, strategy="auto", precision="32-true",
                    batch_size=2, num_workers=0, max_steps=4, warmup_steps=1, val_every_steps=2,
                    checkpoint_every_steps=2, log_every_steps=1, tracking_uri=tracking_uri,
                    system_metrics=False, color_jitter=0.1)
    settings.update(train)
    return dataclasses.replace(params, cache=cache,
                               train=dataclasses.replace(params.train, **settings))


def build_tiny_cache(root: Path, params: Params, num_scenes: int = 6, frames: int = 4,
                     val_scenes: int = 2, seed: int = 0) -> Path:
    """Render box rooms and build ``root/cache/{train,val}``; returns the cache folder."""
    manifest = make_box_room_manifest(root / "raw", num_scenes=num_scenes, frames=frames,
                                      height=SIZE, width=SIZE, seed=seed, val_scenes=val_scenes)
    build_cache(manifest, root / "cache", params, progress=False)
    return root / "cache"


def write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return path


def train_cmd(params_file: Path, cache: Path, out: Path, checkpoints: Path, *extra) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), "--params", str(params_file), "--cache",
            str(cache), "--out", str(out), "--checkpoints", str(checkpoints), *map(str, extra)]


def quiet_env(**extra: str) -> dict[str, str]:
    """Environment of a training subprocess: one torch thread per process (the tests share two
    cores), no inherited tracking URI."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_train(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=quiet_env(), capture_output=True,
                          text=True, timeout=timeout)
