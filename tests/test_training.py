"""Training stage: schedule, param groups, augmentation, DDP-safe batching, checkpoints, errors,
and short in-process runs on a tiny real cache (box rooms -> cache writer -> train)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from scipy.spatial.transform import Rotation

from distill3r.config import RuntimeParams
from distill3r.geometry import depth_to_camera_points, invert_pose, transform_points
from distill3r.models import build_student, load_student
from distill3r import runtime
from distill3r.runtime import available_cores
from distill3r.training import run as run_module
from distill3r.training.augment import Augmenter, choose_views, color_jitter, sample_rng
from distill3r.training.callbacks import AtomicCheckpointIO
from distill3r.training.data import CacheBatches, split_shards
from distill3r.training.module import NonFiniteLossError
from distill3r.training.muon import Muon, orthogonalise
from distill3r.training.run import resolve_precision, train
from distill3r.training.schedule import (build_optimizer, fused_supported, lr_factor,
                                         param_groups)
from training_helpers import build_tiny_cache, tiny_params, torch_threads_restored


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Train: 5 scenes x 3 samples = 15 in shards of 4, 4, 4, 3; val: 2 x 3 = 6 (4, 2)."""
    root = tmp_path_factory.mktemp("tiny_cache")
    return build_tiny_cache(root, tiny_params(), num_scenes=7, val_scenes=2)


@pytest.fixture(autouse=True)
def _restore_threads():
    with torch_threads_restored():
        yield


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# ----------------------------------------------------------------------------------------------
# Schedule and optimiser
# ----------------------------------------------------------------------------------------------
def test_lr_warmup_then_cosine_to_min_at_last_step():
    ratio = 0.1
    f = [lr_factor(s, 20, 5, ratio) for s in range(25)]
    assert f[0] == pytest.approx(1 / 5) and f[4] == pytest.approx(1.0)
    assert f[5] == pytest.approx(1.0)  # cosine starts at the peak
    assert all(a >= b for a, b in zip(f[5:20], f[6:20]))  # monotone decay
    assert f[19] == pytest.approx(ratio) and f[24] == pytest.approx(ratio)
    assert lr_factor(3, 4, 100, ratio) == pytest.approx(1.0)  # warmup capped at the total


def test_param_groups_no_decay_for_norms_biases_tokens():
    model = build_student("tiny")
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert not no_decay & decay and no_decay | decay == set(names.values())
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05
    for key in ("encoder.vit.pos_embed", "encoder.vit.cls_token", "encoder.vit.reg_token",
                "encoder.vit.blocks.0.norm1.weight", "encoder.vit.blocks.0.attn.qkv.bias"):
        assert key in no_decay
    for key in ("encoder.vit.blocks.0.attn.qkv.weight", "encoder.vit.patch_embed.proj.weight"):
        assert key in decay
    optimizer, scheduler = build_optimizer(model, 1e-3, [0.9, 0.95], 0.05, 1e-4, 2, 10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-4])
    assert not any(g["fused"] for g in optimizer.param_groups)
    optimizer, _ = build_optimizer(model, 1e-3, [0.9, 0.95], 0.05, 1e-4, 2, 10, fused=True)
    assert all(g["fused"] for g in optimizer.param_groups)  # CPU parameters: the fused kernel
    with pytest.raises(ValueError, match="min_lr"):
        build_optimizer(model, 1e-3, [0.9, 0.95], 0.05, 1e-2, 2, 10)


def test_fused_adamw_matches_the_default_implementation():
    """The fused kernel takes the same steps as torch's default AdamW (float rounding aside)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused, _ = build_optimizer(models[0], 1e-2, [0.9, 0.95], 0.05, 1e-4, 2, 10, fused=True)
    plain = torch.optim.AdamW(param_groups(models[1], 0.05), lr=5e-3, betas=(0.9, 0.95))
    x = torch.randn(8, 6)
    for _ in range(5):
        for model, optimizer in ((models[0], fused), (models[1], plain)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not fused_supported(nn.Sequential())


@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp"])
def test_module_clips_the_gradient_norm_it_logs_unless_sharded(strategy, tmp_path):
    """One device and DDP: the module clips to train.grad_clip with the norm it logs (the
    trainer does not clip, so a fused AdamW can run); FSDP and DeepSpeed: Lightning clips."""
    from distill3r.config import LossParams, ModelParams, TrainParams
    from distill3r.training.module import DistillModule, clips_in_module

    tp = TrainParams(strategy=strategy, grad_clip=0.5)
    module = DistillModule(ModelParams(name="micro"), LossParams(), tp)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]))
    module.on_before_optimizer_step(None)
    after = float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]))
    assert logged["train/grad_norm"] == pytest.approx(before) and before > 1
    assert clips_in_module(tp) == (strategy != "fsdp")
    assert after == pytest.approx(0.5 if strategy != "fsdp" else before, rel=1e-4)
    if strategy != "fsdp":  # Lightning builds FSDP trainers on GPUs only
        trainer = run_module._trainer(tp, tmp_path / "ckpt", [], progress=False)
        assert trainer.gradient_clip_val is None


def test_bf16_falls_back_to_fp32_on_cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(run_module, "bf16_supported", lambda device: False)
    with pytest.warns(UserWarning, match="falling back"):
        assert resolve_precision("bf16-mixed", "cpu") == "32-true"
    monkeypatch.setattr(run_module, "bf16_supported", lambda device: True)
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_threads_explicit_or_split_between_cpu_ranks():
    before = torch.get_num_threads()
    try:
        one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        # null: every core this process may use, whatever the load (bit-reproducible)
        assert run_module.set_threads(RuntimeParams(), one) == available_cores()
        adapted = run_module.set_threads(RuntimeParams(adapt_to_load=True), one)
        assert 1 <= adapted <= available_cores()
        assert run_module.set_threads(RuntimeParams(threads=1), one) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="runtime.threads"):
        RuntimeParams(threads=0).validate()


def test_wait_policy_passive_only_on_a_busy_machine(monkeypatch, caplog):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="distill3r.runtime"):
        assert runtime.configure_environment(RuntimeParams()) is None  # quiet: OpenMP's default
    assert "OMP_WAIT_POLICY" not in runtime.os.environ and not caplog.records
    monkeypatch.setattr(runtime, "busy_cores", lambda: 1)
    with caplog.at_level(logging.WARNING, logger="distill3r.runtime"):
        assert runtime.configure_environment(RuntimeParams()) == "PASSIVE"
    assert runtime.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    # a slow run must say why: the busy count and the setting that overrides the choice
    assert "1 other runnable task(s)" in caplog.text
    assert "runtime.omp_wait_policy: active" in caplog.text
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the environment wins
    assert runtime.configure_environment(RuntimeParams(omp_wait_policy="passive")) == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0)
    assert runtime.configure_environment(RuntimeParams(omp_wait_policy="passive")) == "PASSIVE"
    with pytest.raises(ValueError, match="omp_wait_policy"):
        RuntimeParams(omp_wait_policy="spin").validate()


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------
def _posed_sample(n: int = 4, size: int = 14, seed: int = 0) -> dict:
    """Exact geometry: random poses and depths; global = view 0's frame."""
    rng = np.random.default_rng(seed)
    K = np.array([[20.0, 0, size / 2], [0, 20.0, size / 2], [0, 0, 1]])
    c2w = np.stack([np.eye(4) for _ in range(n)])
    for i in range(n):
        c2w[i, :3, :3] = Rotation.from_rotvec(rng.normal(size=3) * 0.3).as_matrix()
        c2w[i, :3, 3] = rng.normal(size=3)
    depth = rng.uniform(1, 3, size=(n, size, size))
    local = np.stack([depth_to_camera_points(d, K) for d in depth])
    glob = np.stack([transform_points(invert_pose(c2w[0]) @ c2w[i], local[i]) for i in range(n)])
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {"key": "demo__scene_0000__s000", "images": torch.rand(n, 3, size, size),
            "xyz_global": f32(glob), "xyz_local": f32(local), "c2w": f32(c2w),
            "conf_global": torch.full((n, size, size), 5.0),
            "conf_local": torch.ones(n, size, size),
            "mask": torch.ones(n, size, size, dtype=torch.bool)}


def test_color_jitter_is_seeded_per_view_and_leaves_geometry():
    sample = _posed_sample()
    aug = Augmenter(color_jitter=0.3, seed=1)
    a, b, c = aug(sample, 0), aug(sample, 0), aug(sample, 1)
    assert torch.equal(a["images"], b["images"]) and not torch.equal(a["images"], c["images"])
    assert not torch.equal(a["images"], sample["images"])
    assert a["images"].min() >= 0 and a["images"].max() <= 1
    for key in ("xyz_global", "xyz_local", "conf_global", "mask"):
        assert torch.equal(a[key], sample[key])
    ratios = (a["images"].mean(dim=(1, 2, 3)) / sample["images"].mean(dim=(1, 2, 3)))
    assert ratios.std() > 1e-3  # views get different factors
    assert color_jitter(sample["images"], 0.0, sample_rng(0, 0, "k")) is sample["images"]


def test_view_subset_keeps_view0_and_all_per_view_arrays_in_step():
    sample = _posed_sample(n=6)
    for epoch in range(5):
        out = Augmenter(views=3, seed=0)(sample, epoch)
        assert out["images"].shape[0] == 3 and out["mask"].shape[0] == 3
        assert torch.equal(out["xyz_global"][0], sample["xyz_global"][0])
        picked = [int(torch.nonzero((sample["c2w"] == out["c2w"][j]).all(-1).all(-1))[0])
                  for j in range(3)]
        assert picked[0] == 0 and picked == sorted(picked)
        for j, i in enumerate(picked):
            assert torch.equal(out["xyz_local"][j], sample["xyz_local"][i])
    with pytest.raises(ValueError, match="train.views"):
        choose_views(4, 5, False, np.random.default_rng(0))


def test_shuffle_view0_reexpresses_global_targets_in_the_new_reference():
    sample = _posed_sample(n=4)
    moved = 0
    for epoch in range(8):
        out = Augmenter(views=3, shuffle_view0=True, seed=3)(sample, epoch)
        c2w = out["c2w"].double().numpy()
        moved += not torch.equal(out["c2w"][0], sample["c2w"][0])
        for j in range(3):  # global targets == local points moved by the relative pose
            expect = transform_points(invert_pose(c2w[0]) @ c2w[j],
                                      out["xyz_local"][j].double().numpy())
            np.testing.assert_allclose(out["xyz_global"][j].numpy(), expect, atol=1e-4)
    assert moved >= 2


# ----------------------------------------------------------------------------------------------
# DDP-safe batching over uneven shards
# ----------------------------------------------------------------------------------------------
def _keys(ds: CacheBatches, workers: int) -> list[list[str]]:
    return [[raw["__key__"] for raw in batch] for k in range(workers)
            for batch in ds.worker_batches(k, workers)]


def test_cache_fixture_is_uneven(cache):
    _, shards = split_shards(cache / "train")
    counts = [s.num_samples for s in shards]
    assert sum(counts) == 15 and len(set(counts)) > 1  # 4, 4, 4, 3


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 2), (2, 1, 2), (2, 2, 1), (3, 2, 2),
                                                 (4, 1, 3), (2, 3, 2), (5, 2, 1)])
def test_every_rank_gets_the_same_batches_of_disjoint_samples(cache, world, workers, batch):
    _, shards = split_shards(cache / "train")
    total = sum(s.num_samples for s in shards)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            ds = CacheBatches(shards, batch, rank, world, train=True, seed=0, epoch=epoch)
            batches = _keys(ds, workers)
            assert len(batches) == len(ds) == total // (world * batch)
            assert all(len(b) == batch for b in batches)
            per_rank.append([k for b in batches for k in b])
        seen = Counter(k for keys in per_rank for k in keys)
        assert max(seen.values()) == 1, "a sample was read twice in one epoch"
        assert len(seen) == len(per_rank) * len(per_rank[0]) >= total - world * batch + 1


def test_epochs_reshuffle_and_runs_reproduce(cache):
    _, shards = split_shards(cache / "train")
    e0 = _keys(CacheBatches(shards, 2, epoch=0), 1)
    assert e0 == _keys(CacheBatches(shards, 2, epoch=0), 1)
    assert e0 != _keys(CacheBatches(shards, 2, epoch=1), 1)


def test_a_resumed_epoch_skips_exactly_the_batches_already_trained_on(cache):
    _, shards = split_shards(cache / "train")

    def loader_keys(skip: int, workers: int) -> list[list[str]]:
        ds = CacheBatches(shards, 2, epoch=3, skip_batches=skip)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        return [batch["key"] for batch in loader]

    for workers in (2, 3):
        full = loader_keys(0, workers)
        assert len(full) == 7
        for skip in (1, 2, 5):
            assert loader_keys(skip, workers) == full[skip:], (workers, skip)


def test_validation_is_ordered_complete_and_padded_to_equal_counts(cache):
    _, shards = split_shards(cache / "val")
    total = sum(s.num_samples for s in shards)
    single = [k for b in _keys(CacheBatches(shards, 4, train=False), 2) for k in b]
    assert len(single) == total == len(set(single))
    for world in (2, 4, 7):
        counts, union = set(), set()
        for rank in range(world):
            ds = CacheBatches(shards, 2, rank, world, train=False)
            keys = _keys(ds, 2)
            assert keys == _keys(CacheBatches(shards, 2, rank, world, train=False), 2)
            counts.add((len(ds), sum(map(len, keys))))
            union |= {k for b in keys for k in b}
        assert len(counts) == 1 and union == set(single)


def test_loader_batches_have_model_shapes(cache):
    params = tiny_params()
    _, shards = split_shards(cache / "train")
    ds = CacheBatches(shards, 2, transform=Augmenter(views=2, color_jitter=0.1))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)))
    assert batch["images"].shape == (2, 2, 3, 56, 56) and batch["mask"].dtype == torch.bool
    assert batch["xyz_global"].shape == (2, 2, 56, 56, 3) and len(batch["key"]) == 2
    assert params.cache.image_size == [56, 56]


# ----------------------------------------------------------------------------------------------
# Checkpoint I/O
# ----------------------------------------------------------------------------------------------
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom in the middle of a save")


def test_interrupted_checkpoint_save_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        io.save_checkpoint({"global_step": 4, "w": torch.zeros(1000), "x": _Unpicklable()}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == \
        ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 3
    torch.save({"obj": _Pickled()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"evil.ckpt: refused: .*Unsupported global") as info:
        io.load_checkpoint(tmp_path / "evil.ckpt")
    assert "weights_only=False" not in str(info.value)


class _Pickled:
    pass


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_missing_or_empty_cache_is_a_clear_error(tmp_path):
    params = tiny_params(_uri(tmp_path))
    with pytest.raises(ValueError, match="cache split folder not found"):
        train(params, tmp_path / "nope", tmp_path / "out", tmp_path / "ckpt")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="index.json"):
        train(params, tmp_path / "empty", tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_cache_that_does_not_match_the_params_is_refused(cache, tmp_path):
    base = tiny_params(_uri(tmp_path))
    other_teacher = dataclasses.replace(base, teacher=dataclasses.replace(
        base.teacher, edge_threshold=0.2))
    with pytest.raises(ValueError, match="fingerprint"):
        train(other_teacher, cache, tmp_path / "out", tmp_path / "ckpt")
    other_size = dataclasses.replace(base, cache=dataclasses.replace(base.cache,
                                                                     image_size=[112, 112]))
    with pytest.raises(ValueError, match="image_size"):
        train(other_size, cache, tmp_path / "out", tmp_path / "ckpt")
    too_many_views = dataclasses.replace(base, train=dataclasses.replace(base.train, views=4))
    with pytest.raises(ValueError, match="train.views"):
        train(too_many_views, cache, tmp_path / "out", tmp_path / "ckpt")
    huge_batch = dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=99))
    with pytest.raises(ValueError, match="cannot fill one optimiser step"):
        train(huge_batch, cache, tmp_path / "out", tmp_path / "ckpt")


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_terms_and_keeps_a_finite_last_checkpoint(cache,
                                                                                   tmp_path):
    params = tiny_params(_uri(tmp_path), lr=1e30, min_lr=1e29, warmup_steps=0, max_steps=6,
                         checkpoint_every_steps=1, val_every_steps=100)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ .*loss_global=(nan|inf)") as err:
        train(params, cache, tmp_path / "out", ckpt)
    failed_step = int(str(err.value).split("at step ")[1].split()[0])
    assert not (tmp_path / "out").exists()
    if (ckpt / "last.ckpt").exists():  # saved before the failure: usable and finite
        state = AtomicCheckpointIO().load_checkpoint(ckpt / "last.ckpt")
        assert state["global_step"] <= failed_step
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


# ----------------------------------------------------------------------------------------------
# Short real runs
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_logs_terms_schedule_and_saves_a_loadable_student(cache, tmp_path):
    from mlflow.tracking import MlflowClient

    params = tiny_params(_uri(tmp_path), max_steps=4, accumulate_grad_batches=2, warmup_steps=1,
                         val_every_steps=2, lr=1e-3, min_lr=1e-4)
    result = train(params, cache, tmp_path / "student", tmp_path / "ckpt",
                   run_ref=tmp_path / "run.json", keys_dir=tmp_path / "keys",
                   plots=tmp_path / "curve.csv", metrics=tmp_path / "train.json",
                   step_plots=tmp_path / "steps.csv")
    assert result.global_step == 4
    assert [row["step"] for row in result.val_history] == [0, 2, 4]
    rows = (tmp_path / "steps.csv").read_text().splitlines()
    every = params.train.log_every_steps
    assert rows[0] == "step,loss,lr,samples_per_s,elapsed_s"
    assert [int(float(r.split(",")[0])) for r in rows[1:]] == list(range(every, 5, every))
    lines = (tmp_path / "keys" / "rank0.jsonl").read_text().splitlines()
    steps = Counter(json.loads(line)["step"] for line in lines)
    assert steps == {0: 2, 1: 2, 2: 2, 3: 2}  # every optimiser step accumulates 2 batches
    client = MlflowClient(_uri(tmp_path))
    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    assert run_id == result.run_id
    history = lambda key: {m.step: m.value for m in client.get_metric_history(run_id, key)}  # noqa
    assert sorted(history("train/loss")) == [1, 2, 3, 4]  # the steps as printed
    for term in ("loss_global", "loss_local", "loss_conf", "lr", "grad_norm", "samples_per_s"):
        assert history(f"train/{term}"), term
    lr = history("train/lr")
    assert lr[1] == pytest.approx(1e-3) and lr[4] == pytest.approx(1e-4)
    assert sorted(history("val/loss")) == [0, 2, 4] and history("val/loss_global")
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001" and run.data.tags["cache.fingerprint"]
    # the policy the run's speed depends on (pytest's process: none set, or the environment's)
    assert run.data.tags["runtime.omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY",
                                                                      "default")
    assert {a.path for a in client.list_artifacts(run_id, "student")} == \
        {"student/model.safetensors", "student/config.json"}
    assert (tmp_path / "curve.csv").read_text().startswith("step,loss,")
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["final_val"]["step"] == 4 and report["seconds"] > 0
    assert 1 < report["parameters_m"] < 10  # tiny
    assert run.info.run_name == "train tiny 4 steps"
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")  # the registered student
    assert version.name == "distill3r-student" and version.source == f"runs:/{run_id}/student"
    assert version.tags["cache.fingerprint"] == run.data.tags["cache.fingerprint"]
    assert version.tags["run_id"] == run_id and version.tags["model.name"] == "tiny"
    student = load_student(tmp_path / "student")
    assert student.config.name == "tiny"


def test_trained_weights_do_not_depend_on_how_often_training_validates(cache, tmp_path):
    # the decoder draws random image indices from torch's global RNG while training; a
    # validation pass must not move that stream (a DataLoader without its own generator
    # draws a seed from it whenever an iterator starts)
    weights = []
    for every in (6, 2):
        params = tiny_params(_uri(tmp_path), max_steps=6, val_every_steps=every,
                             registered_model=None)
        result = train(params, cache, tmp_path / f"student{every}", tmp_path / f"ckpt{every}")
        assert [row["step"] for row in result.val_history] == list(range(0, 7, every))
        weights.append(result.student.state_dict())
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


class _StopAt(L.Callback):
    """Ends training after optimiser step ``step``, as an interruption would (``last.ckpt``
    holds that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(cache: Path, params, folder: Path, callbacks: list, ckpt_path=None):
    """Lightning's fit of the run's module and trainer (``params``; seed 0, no MLflow) with
    extra ``callbacks``, checkpoints in ``folder``; returns ``(module, trainer)``."""
    from distill3r.training.data import CacheDataModule
    from distill3r.training.module import DistillModule

    tp = params.train
    L.seed_everything(0)
    module = DistillModule(params.model, params.loss, tp)
    data = CacheDataModule(cache / "train", cache / "val", tp.batch_size, seed=tp.seed)
    trainer = run_module._trainer(tp, folder, callbacks, progress=False)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return module, trainer


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_resumed_run_trains_the_weights_of_the_uninterrupted_one(cache, tmp_path, optimizer):
    # mid-epoch (7 batches per epoch), with the decoder's random image indices drawn every
    # step: the data order, optimiser, schedule and RNG state all have to continue
    params = tiny_params(max_steps=6, val_every_steps=6, checkpoint_every_steps=2,
                         optimizer=optimizer)
    straight, trainer = _fit(cache, params, tmp_path / "straight", [])
    steps = trainer.global_step
    _, trainer = _fit(cache, params, tmp_path / "killed", [_StopAt(4)])
    stopped = trainer.global_step
    resumed, trainer = _fit(cache, params, tmp_path / "killed", [],
                            tmp_path / "killed" / "last.ckpt")
    assert (steps, stopped, trainer.global_step) == (6, 4, 6)
    for (name, a), b in zip(straight.student.state_dict().items(),
                            resumed.student.state_dict().values()):
        assert torch.equal(a, b), name


class _WeightLog(L.Callback):
    """The student's weights at the start, after every optimiser step and at every
    validation batch."""

    def __init__(self) -> None:
        self.steps: dict[int, list[torch.Tensor]] = {}
        self.validated: dict[int, list[torch.Tensor]] = {}
        self.start: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = [p.detach().clone() for p in pl_module.student.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = [p.detach().clone() for p in
                                           pl_module.student.parameters()]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        self.validated[trainer.global_step] = [p.detach().clone() for p in
                                               pl_module.student.parameters()]


def _ema(weights: dict[int, list[torch.Tensor]], first: int, last: int, decay: float,
         start: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    avg = start or weights[first]
    for step in range(first + (start is None), last + 1):
        avg = [decay * a + (1 - decay) * w for a, w in zip(avg, weights[step])]
    return avg


@pytest.mark.slow
def test_ema_weights_are_validated_saved_and_resumed(cache, tmp_path):
    """train.ema_decay: the average of the weights after each step from the end of the warmup
    on is what validation runs and what training leaves in the module; a checkpoint holds the
    average and the trained weights, and a resumed run continues both."""
    decay = 0.6
    params = tiny_params(_uri(tmp_path), max_steps=4, warmup_steps=1, ema_decay=decay,
                         val_every_steps=4, checkpoint_every_steps=4)

    def fit(max_steps: int, ckpt_path=None):
        run = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                    max_steps=max_steps))
        weights = _WeightLog()
        module, _ = _fit(cache, run, tmp_path / "ckpt", [weights], ckpt_path)
        return module, weights

    module, log = fit(4)
    # updates after global steps 2, 3, 4 (step index >= warmup_steps): the first one copies
    expected = _ema(log.steps, 2, 4, decay)
    for got, want in zip(module.student.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(expected, log.steps[4]))
    for got, want in zip(log.validated[4], expected):  # validation ran on the average
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    saved = AtomicCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    names = [f"student.{n}" for n, _ in module.student.named_parameters()]
    for name, want, trained in zip(names, expected, log.steps[4]):
        torch.testing.assert_close(saved["state_dict"][name], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved["current_model_state"][name], trained)

    resumed, log2 = fit(6, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for got, want in zip(log2.start, log.steps[4]):  # training goes on from the trained
        torch.testing.assert_close(got, want)           # weights, not from the average
    expected6 = _ema(log2.steps, 5, 6, decay, start=expected)
    for got, want in zip(resumed.student.parameters(), expected6):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_ema_decay_is_checked():
    with pytest.raises(ValueError, match=r"train.ema_decay=1.0: must be in \[0, 1\)"):
        tiny_params(ema_decay=1.0).train.validate("train")
    with pytest.raises(ValueError, match="train.ema_decay=0.9: weight averaging needs whole"):
        tiny_params(ema_decay=0.9, strategy="fsdp").train.validate("train")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, lr", [("adamw", 1e-3), ("muon", 3e-3)])
def test_overfitting_one_sample_divides_the_loss_by_ten(cache, tmp_path, optimizer, lr):
    base = tiny_params(_uri(tmp_path), optimizer=optimizer)
    base = dataclasses.replace(base, cache=dataclasses.replace(base.cache,
                                                               max_samples_per_scene=1))
    one = build_tiny_cache(tmp_path, base, num_scenes=2, val_scenes=1)
    shutil.rmtree(one / "val")  # validate on the training sample itself
    shutil.copytree(one / "train", one / "val")
    assert json.loads((one / "train" / "index.json").read_text())["num_samples"] == 1
    # squared distances: a tenfold drop means a ~3x smaller point error (with the Euclidean
    # default the same fit divides the loss by ~3). Muon's step, RMS-matched to AdamW's, fits
    # one sample more slowly at the same rate (6.41 -> 1.25 at 1e-3, 6.41 -> 0.22 at 3e-3)
    params = dataclasses.replace(base, train=dataclasses.replace(
        base.train, batch_size=1, max_steps=25, warmup_steps=3, lr=lr,
        min_lr=1e-4, weight_decay=0.0, color_jitter=0.0, val_every_steps=25,
        checkpoint_every_steps=25), loss=dataclasses.replace(base.loss, distance="squared"))
    result = train(params, one, tmp_path / "student", tmp_path / "ckpt")
    first, last = result.val_history[0]["loss"], result.val_history[-1]["loss"]
    assert result.val_history[-1]["step"] == 25
    assert last <= first / 10, f"loss {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("name", ["tiny", "tiny-pyramid-local", "tiny-pose"])
def test_muon_takes_the_hidden_matrices_and_kernels_and_adamw_the_rest(name):
    model = build_student(name)
    groups = {g["name"]: g for g in param_groups(model, 0.05, muon=True)}
    names = {id(p): n for n, p in model.named_parameters()}
    sets = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert list(groups) == ["muon", "decay", "no_decay"]
    assert sum(map(len, sets.values())) == len(names) and set.union(*sets.values()) == set(
        names.values())
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in sets["muon"])
    for key in ("encoder.vit.blocks.0.attn.qkv.weight", "encoder.vit.blocks.0.mlp.fc1.weight",
                "head_local.fusion.0.rcu1.conv1.weight", "head_local.resample.0.weight"):
        assert key in sets["muon"]
    # input layers (3-channel image), output layers, tokens and embeddings stay with AdamW
    image_convs = {n for n, m in model.named_modules()
                   if isinstance(m, nn.Conv2d) and m.in_channels == 3}
    assert image_convs and {f"{n}.weight" for n in image_convs} <= sets["decay"]
    outputs = {"head_local.out_conv3.weight"} | (
        {"head_global.mlp.2.weight"} if name == "tiny-pose" else {"head_global.out_conv3.weight"})
    assert outputs <= sets["decay"]
    assert sets["decay"] == {f"{n}.weight" for n in image_convs} | outputs
    assert "encoder.vit.pos_embed" in sets["no_decay"]


def test_muon_optimizer_groups_schedule_and_errors():
    model = build_student("tiny")
    optimizer, scheduler = build_optimizer(model, 1e-3, [0.9, 0.95], 0.05, 1e-4, 2, 10,
                                           kind="muon")
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4] * 3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.05, 0.0]
    optimizer.step()  # no gradients yet: nothing moves
    scheduler.step()  # the schedule reaches the inner optimisers' groups
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert [g["lr"] for g in optimizer.adamw.param_groups] == pytest.approx([1e-3, 1e-3])
    with pytest.raises(NotImplementedError, match="takes its parameter groups when it is built"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))]})
    with pytest.raises(ValueError, match="train.optimizer must be 'adamw' or 'muon'"):
        build_optimizer(model, 1e-3, [0.9, 0.95], 0.05, 1e-4, 2, 10, kind="sgd")
    with pytest.raises(ValueError, match="no weight matrices or kernels"):
        build_optimizer(nn.Conv2d(3, 4, 3), 1e-3, [0.9, 0.95], 0.05, 1e-4, 2, 10, kind="muon")
    with pytest.raises(ValueError, match=r"kernels only, got a parameter of shape \(4,\)"):
        Muon([torch.zeros(4)])


def test_muon_step_is_orthogonalised_with_the_rms_of_an_adamw_step():
    """A Muon update of an A x B matrix has (nearly) equal singular values whatever the
    gradient's spectrum, and the RMS 0.2 * lr of a typical AdamW update (the match_rms_adamw
    scaling), so the two halves share one learning rate."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 24, bias=False)
    u, _ = torch.linalg.qr(torch.randn(24, 24))
    v, _ = torch.linalg.qr(torch.randn(48, 24))
    spectrum = torch.logspace(0, 2, 24)  # condition number 100
    layer.weight.grad = u @ torch.diag(spectrum) @ v.T
    optimizer, _ = build_optimizer(layer, 1e-2, [0.9, 0.95], 0.0, 0.0, 0, 10, kind="muon")
    before = layer.weight.detach().clone()
    optimizer.step()
    update = (before - layer.weight.detach()).double()
    singular = torch.linalg.svdvals(update)
    assert singular.max() / singular.min() < 4  # against 100 for the gradient
    rms = update.square().mean().sqrt()
    assert 0.1 * 1e-2 < rms < 0.3 * 1e-2  # 0.2 * lr, the Newton-Schulz spread aside
    # and the direction still descends: positive inner product with the gradient
    assert float((update * layer.weight.grad.double()).sum()) > 0


def test_muon_state_round_trips_and_refuses_an_adamw_state(tmp_path):
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)) for _ in range(2)]
    x = torch.randn(16, 6)

    def step(model, optimizer):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    first, _ = build_optimizer(models[0], 1e-2, [0.9, 0.95], 0.05, 1e-4, 1, 10, kind="muon")
    for _ in range(3):
        step(models[0], first)
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    models[1].load_state_dict(models[0].state_dict())
    second, _ = build_optimizer(models[1], 1e-2, [0.9, 0.95], 0.05, 1e-4, 1, 10, kind="muon")
    second.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert len(second.state) == len(list(models[1].parameters()))  # momenta and moments
    for _ in range(2):
        step(models[0], first)
        step(models[1], second)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    adamw, _ = build_optimizer(models[1], 1e-2, [0.9, 0.95], 0.05, 1e-4, 1, 10)
    with pytest.raises(ValueError, match="trained with another train.optimizer"):
        second.load_state_dict(adamw.state_dict())


def test_muon_is_refused_with_sharded_strategies():
    with pytest.raises(ValueError, match="train.optimizer='muon': Muon orthogonalises whole"):
        tiny_params(optimizer="muon", strategy="fsdp").train.validate("train")
    with pytest.raises(ValueError, match=r"train.muon_ns_steps=0: must be in \[1, 99\]"):
        tiny_params(optimizer="muon", muon_ns_steps=0).train.validate("train")
    tiny_params(optimizer="muon", strategy="ddp").train.validate("train")


def test_orthogonalise_flattens_the_spectrum_of_wide_tall_and_kernel_matrices():
    torch.manual_seed(0)
    for k, a, b in ((3, 6, 10), (2, 10, 6), (1, 16, 72)):
        n = min(a, b)
        u = torch.linalg.qr(torch.randn(k, a, a))[0][:, :, :n]
        v = torch.linalg.qr(torch.randn(k, b, b))[0][:, :, :n]
        grads = u @ torch.diag_embed(torch.logspace(0, 2, n).expand(k, n)) @ v.mT
        ortho = orthogonalise(grads, 5)
        assert ortho.shape == grads.shape and ortho.dtype == grads.dtype
        singular = torch.linalg.svdvals(ortho.double())
        assert singular.min() > 0.45 and singular.max() < 1.3, (k, a, b)
        # the same singular vectors: U^T O V is diagonal
        core = u.mT.double() @ ortho.double() @ v.double()
        off = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
        assert off.abs().max() < 0.05
    # a conv kernel [O, I, k, k] is stepped as the O x (I k k) matrix it applies
    conv = nn.Conv2d(4, 8, 3, bias=False)
    conv.weight.grad = torch.randn_like(conv.weight) * torch.logspace(0, 2, 8)[:, None, None, None]
    optimizer, _ = build_optimizer(conv, 1e-2, [0.9, 0.95], 0.0, 0.0, 0, 10, kind="muon")
    before = conv.weight.detach().clone()
    optimizer.step()
    singular = torch.linalg.svdvals((before - conv.weight.detach()).reshape(8, 36).double())
    assert singular.max() / singular.min() < 3
