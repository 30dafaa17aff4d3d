"""DUNE checkpoint -> timm encoder: key conversion, CLS/pos folding, strictness, no unpickling."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill3r.models import build_student, get_config
from distill3r.models.dune import dune_to_timm, load_dune_encoder, read_dune_checkpoint
from distill3r.models.encoder import Encoder

KEYS_JSON = Path("/work/shared/reference/dune_vitsmall14_448_encoder_keys.json")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dune_keys() -> dict[str, list[int]]:
    """Encoder tensor names and shapes of DUNE ViT-S/14 448 (``dune_vitsmall14_448.pth``)."""
    d, hidden = 384, 1536
    keys = {"encoder.cls_token": [1, 1, d], "encoder.pos_embed": [1, 1025, d],
            "encoder.register_tokens": [1, 4, d], "encoder.mask_token": [1, d],
            "encoder.patch_embed.proj.weight": [d, 3, 14, 14],
            "encoder.patch_embed.proj.bias": [d]}
    block = {"norm1.weight": [d], "norm1.bias": [d], "attn.qkv.weight": [3 * d, d],
             "attn.qkv.bias": [3 * d], "attn.proj.weight": [d, d], "attn.proj.bias": [d],
             "ls1.gamma": [d], "norm2.weight": [d], "norm2.bias": [d],
             "mlp.fc1.weight": [hidden, d], "mlp.fc1.bias": [hidden],
             "mlp.fc2.weight": [d, hidden], "mlp.fc2.bias": [d], "ls2.gamma": [d]}
    for i in range(12):
        keys.update({f"encoder.blocks.0.{i}.{k}": v for k, v in block.items()})
    keys.update({"encoder.norm.weight": [d], "encoder.norm.bias": [d]})
    return keys


@pytest.fixture(scope="module")
def dune_state() -> dict[str, torch.Tensor]:
    """A random state dict in DUNE's layout (encoder keys from the reference list + extras)."""
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*shape, generator=g) for k, shape in _dune_keys().items()}
    state["projectors.dino.0.weight"] = torch.randn(8, 384, generator=g)
    state["teacher_norms.dino.mean"] = torch.randn(384, generator=g)
    return state


def _save(state: dict, path: Path, args=None) -> Path:
    args = args if args is not None else argparse.Namespace(
        arch="vit_small", lr=1e-4, teachers=["dino2", "mast3r"], sizes={"a": 448}, name="dune")
    torch.save({"model": state, "args": args}, path)
    return path


@pytest.fixture(scope="module")
def paper_encoder() -> Encoder:
    return Encoder(get_config("paper"))


def test_key_list_matches_reference_totals():
    keys = _dune_keys()
    assert len(keys) == 176
    assert sum(torch.Size(s).numel() for s in keys.values()) == 21_925_632
    if KEYS_JSON.is_file():  # the shared reference list, when this machine has it
        assert json.loads(KEYS_JSON.read_text())["keys"] == keys


def test_round_trip_with_cls_pos_folding(dune_state, paper_encoder, tmp_path):
    path = _save(dune_state, tmp_path / "dune.pth")
    load_dune_encoder(paper_encoder.vit, path)
    loaded = paper_encoder.vit.state_dict()
    pos = dune_state["encoder.pos_embed"]
    assert torch.equal(loaded["cls_token"], dune_state["encoder.cls_token"] + pos[:, :1])
    assert loaded["pos_embed"].shape == (1, 1024, 384)
    assert torch.equal(loaded["pos_embed"], pos[:, 1:])
    assert torch.equal(loaded["reg_token"], dune_state["encoder.register_tokens"])
    for i in (0, 5, 11):
        for name in ("attn.qkv.weight", "ls1.gamma", "mlp.fc2.bias", "norm2.weight"):
            assert torch.equal(loaded[f"blocks.{i}.{name}"],
                               dune_state[f"encoder.blocks.0.{i}.{name}"])
    assert torch.equal(loaded["patch_embed.proj.weight"],
                       dune_state["encoder.patch_embed.proj.weight"])
    assert torch.equal(loaded["norm.bias"], dune_state["encoder.norm.bias"])
    assert "mask_token" not in loaded


def test_build_student_loads_encoder_weights(dune_state, tmp_path):
    path = _save(dune_state, tmp_path / "dune.pth")
    model = build_student("paper", encoder_weights=str(path))
    got = model.encoder.vit.state_dict()
    assert torch.equal(got["blocks.7.attn.proj.weight"],
                       dune_state["encoder.blocks.0.7.attn.proj.weight"])


def test_wrapper_prefixes_and_unchunked_blocks_are_accepted():
    t = torch.zeros(1)
    converted = dune_to_timm({
        "module.encoder.blocks.0.3.norm1.weight": t,
        "_orig_mod.encoder.register_tokens": t,
        "encoder._orig_mod.blocks.4.norm1.bias": t,
        "encoder.mask_token": t,
        "projectors.dino.weight": t,
    })
    assert sorted(converted) == ["blocks.3.norm1.weight", "blocks.4.norm1.bias", "reg_token"]


def test_mismatching_checkpoint_names_the_keys(dune_state, paper_encoder, tmp_path):
    state = dict(dune_state)
    del state["encoder.blocks.0.11.mlp.fc2.bias"]
    state["encoder.blocks.0.12.norm1.weight"] = torch.zeros(384)
    state["encoder.norm.weight"] = torch.zeros(383)
    path = _save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        load_dune_encoder(paper_encoder.vit, path)
    message = str(info.value)
    assert "missing keys: blocks.11.mlp.fc2.bias" in message
    assert "unexpected keys: blocks.12.norm1.weight" in message
    assert "norm.weight (file (383,) vs model (384,))" in message
    assert "bad.pth" in message


def test_wrong_architecture_is_rejected(dune_state, tmp_path):
    path = _save(dune_state, tmp_path / "dune.pth")
    with pytest.raises(ValueError, match="shape mismatches: .*blocks.0.attn.qkv.weight"):
        load_dune_encoder(Encoder(get_config("tiny")).vit, path)


class Payload:
    """Unpickling this would create a marker file: the loader must never run it."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_non_allowlisted_pickle_is_refused_and_never_run(tmp_path):
    payload = Payload()
    payload.marker = str(tmp_path / "pwned")
    path = _save({"encoder.norm.weight": torch.zeros(384)}, tmp_path / "evil.pth", args=payload)
    with pytest.raises(ValueError, match=r"refused to unpickle type\(s\) .*pathlib"):
        read_dune_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


class Options:  # a plain custom class: still not allowed
    def __init__(self):
        self.lr = 1e-4


def test_custom_class_in_args_is_named(tmp_path):
    path = _save({"encoder.norm.weight": torch.zeros(384)}, tmp_path / "opts.pth", args=Options())
    with pytest.raises(ValueError, match=r"Options"):
        read_dune_checkpoint(path)


def test_missing_or_garbage_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_dune_checkpoint(tmp_path / "nope.pth")
    for name, data in (("junk.pth", b"not a checkpoint"), ("zeros.pth", bytes(300)),
                       ("text.pth", b"hello world garbage" * 10)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: not a readable torch checkpoint"):
            read_dune_checkpoint(tmp_path / name)


def _upstream_args(**extra) -> argparse.Namespace:
    """``args`` as upstream training saves it: plain options plus numpy schedules."""
    return argparse.Namespace(
        arch="vit_small", lr=1e-4, teachers=["dino2", "mast3r"], sizes={"a": 448},
        lr_schedule=np.linspace(1e-4, 1e-6, 50), momentum_schedule=np.full(50, 0.996, np.float32),
        epoch_steps=np.arange(4, dtype=np.int64), best=np.float64(0.25), **extra)


def test_upstream_style_checkpoint_with_numpy_args_loads(dune_state, paper_encoder, tmp_path):
    wrapped = {f"module.{k}": v for k, v in dune_state.items()}
    path = _save(wrapped, tmp_path / "dune_upstream.pth", args=_upstream_args())
    load_dune_encoder(paper_encoder.vit, path)
    assert torch.equal(paper_encoder.vit.state_dict()["blocks.3.mlp.fc1.bias"],
                       dune_state["encoder.blocks.0.3.mlp.fc1.bias"])


def test_other_class_beside_numpy_args_is_refused_and_never_run(tmp_path):
    payload = Payload()
    payload.marker = str(tmp_path / "pwned")
    path = _save({"encoder.norm.weight": torch.zeros(384)}, tmp_path / "mixed.pth",
                 args=_upstream_args(extra=Options(), hook=payload))
    with pytest.raises(ValueError) as info:
        read_dune_checkpoint(path)
    message = str(info.value)
    assert "refused to unpickle" in message and "Options" in message and "pathlib" in message
    assert "numpy" not in message.split("type(s)")[1].split("(only")[0]
    assert not (tmp_path / "pwned").exists()


def _dinov2_resize(table: np.ndarray, m: int, h: int, w: int) -> np.ndarray:
    """Independent float64 evaluation of ``F.interpolate(table, scale_factor=((h + 0.1) / m,
    (w + 0.1) / m), mode="bicubic", align_corners=False, antialias=False)``: Keys' cubic
    kernel (a = -0.75), source coordinate ``(dst + 0.5) / scale - 0.5``, edge-clamped taps."""
    def weights(t):
        a = -0.75
        x = np.array([1 + t, t, 1 - t, 2 - t])
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x <= 1, near, far)

    def taps(out_len, scale):
        rows = np.zeros((out_len, m))
        for d in range(out_len):
            src = (d + 0.5) / scale - 0.5
            i0 = int(np.floor(src))
            for k, wk in zip(range(i0 - 1, i0 + 3), weights(src - i0)):
                rows[d, min(max(k, 0), m - 1)] += wk
        return rows

    grid = table.reshape(m, m, -1).astype(np.float64)
    ry, rx = taps(h, (h + 0.1) / m), taps(w, (w + 0.1) / m)
    return np.einsum("ym,xn,mnc->yxc", ry, rx, grid).reshape(h * w, -1)


@pytest.mark.parametrize("grid", [(16, 16), (16, 37), (37, 16), (28, 37), (37, 37)])
def test_position_table_is_resized_the_dune_way(paper_encoder, grid):
    vit = paper_encoder.vit
    g = torch.Generator().manual_seed(1)
    # a non-smooth table (white noise at DINOv2's init scale, std 0.02) shows any difference in
    # the resampling; torch evaluates it in float32, as upstream does
    with torch.no_grad():
        vit.pos_embed.copy_(0.02 * torch.randn(vit.pos_embed.shape, generator=g))
    h, w = grid
    tokens = vit._pos_embed(torch.zeros(1, h, w, 384))
    got = tokens[0, vit.num_prefix_tokens:].detach().double().numpy()
    want = _dinov2_resize(vit.pos_embed.detach().numpy()[0], 32, h, w)
    assert got.shape == want.shape == (h * w, 384)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_position_table_is_untouched_at_its_own_grid(paper_encoder):
    vit = paper_encoder.vit
    tokens = vit._pos_embed(torch.zeros(2, 32, 32, 384))
    assert torch.equal(tokens[:, vit.num_prefix_tokens:], vit.pos_embed.expand(2, -1, -1))
    prefix = torch.cat([vit.cls_token, vit.reg_token], dim=1).expand(2, -1, -1)
    assert torch.equal(tokens[:, :vit.num_prefix_tokens], prefix)
