"""Kill a training run with SIGKILL after its first checkpoint, resume it with ``--resume``."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from distill3r.training.callbacks import AtomicCheckpointIO
from distill3r.training.run import train
from training_helpers import (build_tiny_cache, quiet_env, run_train, tiny_params,
                              train_cmd, write_params)


def _adam_steps(state: dict) -> set[float]:
    """The step counts of the AdamW state in a checkpoint (with Muon: its AdamW half's)."""
    optimizer = state["optimizer_states"][0]
    optimizer = optimizer.get("adamw", optimizer)
    return {float(s["step"]) for s in optimizer["state"].values()}


pytestmark = pytest.mark.usefixtures("restore_torch_threads")


@pytest.mark.slow
def test_sigkilled_run_resumes_from_last_checkpoint_with_optimizer_and_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = tiny_params(uri, max_steps=200, checkpoint_every_steps=2, val_every_steps=1000,
                         warmup_steps=2)
    cache = build_tiny_cache(tmp_path, params)
    params_file = write_params(params, tmp_path / "params.yaml")
    ckpt = tmp_path / "ckpt"
    cmd = train_cmd(params_file, cache, tmp_path / "student", ckpt)

    proc = subprocess.Popen(cmd + ["--debug-keys", str(tmp_path / "keys1")], cwd=tmp_path,
                            env=quiet_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (ckpt / "last.ckpt").exists():
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.2)
        time.sleep(1.0)  # let it run on: the kill may now land in a step or in a save
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "student").exists()

    io = AtomicCheckpointIO()
    killed = io.load_checkpoint(ckpt / "last.ckpt")  # never truncated, even if killed mid-save
    step = killed["global_step"]
    assert step >= 2 and step % 2 == 0
    assert _adam_steps(killed) == {float(step)}
    run_id = json.loads((ckpt / "mlflow_run.json").read_text())["run_id"]

    target = step + 2
    out = run_train(cmd + ["--resume", "--max-steps", target, "--run-ref",
                           tmp_path / "run.json", "--debug-keys", tmp_path / "keys2"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert f"Restoring states from the checkpoint path at {ckpt / 'last.ckpt'}" in \
        out.stdout + out.stderr
    resumed_steps = [json.loads(line)["step"]
                     for line in (tmp_path / "keys2" / "rank0.jsonl").read_text().splitlines()]
    assert resumed_steps == [step, step + 1]  # the step count continues

    final = io.load_checkpoint(ckpt / "last.ckpt")
    assert final["global_step"] == target
    assert _adam_steps(final) == {float(target)}  # moments continued, not restarted at 0
    assert final["lr_schedulers"][0]["last_epoch"] == target
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == run_id

    from mlflow.tracking import MlflowClient

    losses = {m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")}
    # Lightning's ModelCheckpoint saves step S in on_train_batch_end, before the logger sends
    # that step's metrics: a kill between the two loses metric S and nothing earlier.
    assert set(range(1, step)) <= losses  # the killed run's metrics
    assert {step + 1, step + 2} <= losses  # the resumed run's steps, in the same MLflow run

    # A resume with another model or loss is refused (the checkpoint records its params).
    other = dataclasses.replace(params, loss=dataclasses.replace(params.loss, alpha_global=3.0))
    with pytest.raises(ValueError, match="cannot resume.*loss"):
        train(other, cache, tmp_path / "student2", ckpt, resume=True, max_steps=target + 1)
    assert torch.equal(io.load_checkpoint(ckpt / "last.ckpt")["state_dict"][
        "student.encoder.vit.pos_embed"], final["state_dict"]["student.encoder.vit.pos_embed"])
