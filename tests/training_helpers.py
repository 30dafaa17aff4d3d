"""Shared fixtures of the training tests: a tiny teacher cache and tiny training params.

The cache is real: analytic box-room scenes (``boxroom.py``) -> manifest -> the cache writer
with the ground-truth teacher, at 56x56 with 3 views per sample (a few seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import torch
import yaml

from boxroom import make_box_room_manifest
from distill3r.cache.writer import build_cache
from distill3r.config import Params, to_dict

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "stages" / "train.py"
SIZE = 56


def tiny_params(tracking_uri: str | None = None, **train) -> Params:
    """Default params shrunk for tests: 56x56, 3 views, batch 2, CPU, fp32 (bf16 on
    small CPU batches gains nothing), one torch thread (the test machine's two cores are
    shared: oversubscribed OpenMP threads crawl), no loader workers and no system metrics;
    the ``tiny`` model and random view subsets pinned (the sample counts the tests rely on),
    whatever the demo defaults; ``train`` overrides."""
    params = Params()
    cache = dataclasses.replace(params.cache, image_size=[SIZE, SIZE], views_per_sample=3,
                                max_samples_per_scene=3, shard_max_samples=4, sampling="random")
    settings = dict(accelerator="cpu", devices=1, strategy="auto", precision="32-true",
                    batch_size=2, num_workers=0, max_steps=4, warmup_steps=1,
                    val_every_steps=2, checkpoint_every_steps=2, log_every_steps=1,
                    tracking_uri=tracking_uri, system_metrics=False, color_jitter=0.1,
                    views=None, shuffle_view0=False)
    settings.update(train)
    runtime = dataclasses.replace(params.runtime, threads=settings.pop("threads", 1))
    return dataclasses.replace(params, cache=cache, runtime=runtime,
                               model=dataclasses.replace(params.model, name="tiny"),
                               train=dataclasses.replace(params.train, **settings))


def build_tiny_cache(root: Path, params: Params, num_scenes: int = 6, frames: int = 4,
                     val_scenes: int = 2, seed: int = 0) -> Path:
    """Render box rooms and build ``root/cache/{train,val}``; returns the cache folder."""
    manifest = make_box_room_manifest(root / "raw", num_scenes=num_scenes, frames=frames,
                                      height=SIZE, width=SIZE, seed=seed, val_scenes=val_scenes)
    build_cache(manifest, root / "cache", params, progress=False)
    return root / "cache"


@contextlib.contextmanager
def torch_threads_restored() -> Iterator[None]:
    """Restore the torch thread count that an in-process ``train()`` (``runtime.threads``) set."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def run_train(cmd: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a training command in its own process group; on timeout the whole group (DDP ranks,
    loader workers) is killed, so nothing outlives the test."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, cwd=cwd, env=quiet_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} timed out after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
