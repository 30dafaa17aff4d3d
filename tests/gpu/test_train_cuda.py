"""bf16 training on one GPU, and DDP over two GPUs when the machine has them."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from distill3r.training.run import train
from training_helpers import build_tiny_cache, run_train, tiny_params, train_cmd, write_params


def _gpu_params(tmp_path, **train_overrides):
    return tiny_params(f"sqlite:///{tmp_path / 'mlflow.db'}", accelerator="gpu",
                       precision="bf16-mixed", **train_overrides)


def test_bf16_training_step_on_one_gpu(tmp_path, report):
    params = _gpu_params(tmp_path, devices=1, max_steps=3, val_every_steps=3,
                         checkpoint_every_steps=3)
    cache = build_tiny_cache(tmp_path, params)
    torch.cuda.reset_peak_memory_stats()
    result = train(params, cache, tmp_path / "student", tmp_path / "ckpt")
    assert result.global_step == 3
    final = result.val_history[-1]
    assert all(math.isfinite(v) for v in final.values())
    assert next(result.student.parameters()).dtype == torch.float32  # mixed: fp32 master weights
    report("train_bf16", {"steps": result.global_step, "val_loss": final["loss"],
                          "peak_mb": torch.cuda.max_memory_allocated() / 2**20})


def test_weight_average_lives_on_the_gpu_and_is_saved(tmp_path, monkeypatch):
    """train.ema_decay on CUDA: the average is kept on the device (no per-step copy to the
    host) and the saved student is the average, not the last weights."""
    from distill3r.training.callbacks import AtomicCheckpointIO, WeightEMA

    params = _gpu_params(tmp_path, devices=1, max_steps=4, warmup_steps=1, ema_decay=0.5,
                         val_every_steps=4, checkpoint_every_steps=4)
    cache = build_tiny_cache(tmp_path, params)
    seen = {}
    original = WeightEMA.on_train_batch_end

    def spy(self, trainer, pl_module, *args):
        original(self, trainer, pl_module, *args)
        if self._average_model is not None:
            seen["device"] = next(self._average_model.parameters()).device
    monkeypatch.setattr(WeightEMA, "on_train_batch_end", spy)
    result = train(params, cache, tmp_path / "student", tmp_path / "ckpt")
    assert seen["device"].type == "cuda"
    saved = AtomicCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    average, trained = saved["state_dict"], saved["current_model_state"]
    named = list(result.student.named_parameters())
    assert all(torch.equal(p.detach().cpu(), average[f"student.{n}"].cpu()) for n, p in named)
    assert any(not torch.equal(average[f"student.{n}"], trained[f"student.{n}"])
               for n, _ in named)


def test_a_resume_restores_the_cuda_rng_state_of_the_checkpoint(tmp_path, monkeypatch):
    """The decoder draws its random image indices on the GPU: a checkpoint holds the CUDA
    generator's state and a resumed run starts its first step from it."""
    from distill3r.training.callbacks import AtomicCheckpointIO
    from distill3r.training.module import DistillModule

    params = _gpu_params(tmp_path, devices=1, max_steps=2, val_every_steps=2,
                         checkpoint_every_steps=2)
    cache = build_tiny_cache(tmp_path, params)
    train(params, cache, tmp_path / "student", tmp_path / "ckpt")
    saved = AtomicCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert set(saved["distill3r_rng"]) == {"cpu", "cuda"}
    seen = []

    def first_batch(self, batch, batch_idx):
        if not seen:
            seen.append((torch.get_rng_state(), torch.cuda.get_rng_state()))
    monkeypatch.setattr(DistillModule, "on_train_batch_start", first_batch)
    torch.cuda.manual_seed(12345)  # anything but the saved state
    result = train(params, cache, tmp_path / "student2", tmp_path / "ckpt", resume=True,
                   max_steps=3)
    assert result.global_step == 3
    assert torch.equal(seen[0][0], saved["distill3r_rng"]["cpu"])
    assert torch.equal(seen[0][1], saved["distill3r_rng"]["cuda"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ddp_on_two_gpus_through_the_stage(tmp_path):
    params = _gpu_params(tmp_path, devices=2, strategy="ddp", batch_size=2, max_steps=4,
                         val_every_steps=100, checkpoint_every_steps=100)
    params = dataclasses.replace(params, cache=dataclasses.replace(params.cache,
                                                                   shard_max_samples=3))
    cache = build_tiny_cache(tmp_path, params, num_scenes=8, val_scenes=2)
    cmd = train_cmd(write_params(params, tmp_path / "params.yaml"), cache, tmp_path / "student",
                    tmp_path / "ckpt", "--no-progress")
    out = run_train(cmd, tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert (tmp_path / "student" / "model.safetensors").is_file()
