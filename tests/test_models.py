"""Student: parameter counts, forward/backward on every shape, determinism, checkpoints."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from distill3r.models import (MODEL_CONFIGS, Student, StudentConfig, build_student,
                              count_parameters, get_config, load_student, save_student)
from distill3r.models.activations import get_activation, xyz_exp
from distill3r.models.dpt import DPTHead, ResidualConvUnit, StrideTwoConv
from distill3r.models.pose_head import rotation_from_6d

PAPER_PARAMS = 71_969_288
FAST3R_PARAMS = 647_600_000

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _meta_counts(name: str) -> dict[str, int]:
    with torch.device("meta"):  # no 2.6 GB allocation for fast3r-large
        return count_parameters(Student(get_config(name)))


@pytest.fixture(scope="module")
def tiny() -> Student:
    torch.manual_seed(0)
    return build_student("tiny", head_chunk_size=3)


def _images(b: int, n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_paper_parameter_count():
    counts = _meta_counts("paper")
    assert abs(counts["total"] - PAPER_PARAMS) / PAPER_PARAMS < 0.005, counts
    assert counts["encoder"] == pytest.approx(21.9e6, rel=0.01)
    assert counts["decoder"] == pytest.approx(10.8e6, rel=0.01)
    assert counts["head_global"] == counts["head_local"] == pytest.approx(19.6e6, rel=0.01)


def test_fast3r_large_parameter_count():
    counts = _meta_counts("fast3r-large")
    assert abs(counts["total"] - FAST3R_PARAMS) / FAST3R_PARAMS < 0.02, counts


def test_tiny_is_small():
    assert 1e6 < _meta_counts("tiny")["total"] < 10e6


def test_tiny_lite_is_tiny_with_narrower_heads():
    lite, tiny = _meta_counts("tiny-lite"), _meta_counts("tiny")
    for part in ("encoder", "decoder"):
        assert lite[part] == tiny[part]
    assert lite["head_global"] == lite["head_local"] < tiny["head_global"] / 2
    assert 5e6 < lite["total"] < 6e6


def test_conv_stem_keeps_the_token_grid_and_trains(tmp_path):
    torch.manual_seed(0)
    conv, lite = build_student("tiny-conv").eval(), build_student("tiny-lite").eval()
    images = _images(1, 2, 56, 84)
    tokens = conv.encoder(images.flatten(0, 1))
    assert tokens.shape == lite.encoder(images.flatten(0, 1)).shape == (2, 4 * 6, 192)
    stem = {n for n, _ in conv.named_parameters() if n.startswith("encoder.vit.patch_embed")}
    assert stem == {f"encoder.vit.patch_embed.proj.{k}.{w}" for k in (0, 2, 4)
                    for w in ("weight", "bias")}
    rest = {n for n, _ in conv.named_parameters()} - stem
    assert rest == {n for n, _ in lite.named_parameters()
                    if not n.startswith("encoder.vit.patch_embed")}
    conv.train()
    out = conv(images)
    out["xyz_local"].sum().backward()
    assert all(conv.encoder.vit.patch_embed.proj[k].weight.grad.abs().sum() > 0 for k in (0, 2, 4))
    conv.eval()
    save_student(conv, tmp_path / "conv")
    loaded = load_student(tmp_path / "conv")
    assert loaded.config.enc_stem_dim == 32
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images)["xyz_global"], conv(images)["xyz_global"])


def test_conv_stem_refuses_dune_weights_and_odd_patches():
    with pytest.raises(ValueError, match="convolutional stem.*DUNE encoder weights"):
        build_student("tiny-conv", encoder_weights="dune_vitsmall14_448.pth")
    with pytest.raises(ValueError, match="needs an even patch_size, got 7"):
        StudentConfig.from_dict({**get_config("tiny-conv").to_dict(), "patch_size": 7})
    # a config.json written before the stem existed loads as the plain patch embedding
    old = {k: v for k, v in get_config("tiny").to_dict().items() if k != "enc_stem_dim"}
    assert StudentConfig.from_dict(old) == get_config("tiny")


def test_micro_is_a_smaller_student_of_the_same_structure():
    micro, tiny = _meta_counts("micro"), _meta_counts("tiny")
    assert 1e6 < micro["total"] < 2e6
    assert micro["total"] < tiny["total"] / 4
    assert set(micro) == set(tiny)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("hw", [(28, 42), (42, 28)], ids=["landscape", "portrait"])
def test_forward_backward_every_parameter_gets_a_gradient(tiny, n, hw):
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    h, w = hw
    out = tiny(_images(2, n, h, w))
    assert out["xyz_global"].shape == (2, n, h, w, 3)
    assert out["xyz_local"].shape == (2, n, h, w, 3)
    assert out["conf_global"].shape == (2, n, h, w)
    assert out["conf_local"].shape == (2, n, h, w)
    assert all(v.dtype == torch.float32 for v in out.values())
    assert (out["conf_global"] >= 1).all() and (out["conf_local"] >= 1).all()
    loss = sum(v.square().mean() if k.startswith("xyz") else v.mean() for k, v in out.items())
    loss.backward()
    for name, param in tiny.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"


def test_bf16_autocast_forward_is_finite(tiny):
    tiny.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(_images(1, 3, 42, 28))
    for key, value in out.items():
        assert value.dtype == torch.float32, key
        assert torch.isfinite(value).all(), f"{key}: {int(value.isnan().sum())} NaN"


@pytest.mark.parametrize("hw", [(3, 2), (8, 1), (4, 4)])
def test_stride_two_conv_is_right_in_bf16(hw):
    """Regression: oneDNN's bf16 stride-2 conv is wrong when the output is one column wide
    (images <= 2 patches wide); StrideTwoConv runs those in float32."""
    torch.manual_seed(0)
    conv = StrideTwoConv(256)
    x = torch.randn(3, 256, *hw)
    with torch.no_grad():
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=2, padding=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = conv(x)
    assert low.shape == ref.shape
    assert (low.double() - ref).abs().max() < 0.05 * ref.abs().max()


def test_head_output_stage_is_float32_without_autograd():
    """Under bf16 autocast a DPT head's output stage rounds to bf16 while autograd records
    (training) and runs in float32 without it (validation, evaluation, inference): the outputs
    are then mostly not bf16 numbers, and match a float32 run of the two output convs on the
    same features. A head whose weights are bf16 takes the same path."""
    torch.manual_seed(0)
    head = DPTHead([32] * 4, [8, 16, 32, 64], 16, 8, image_dim=8)
    tokens = [torch.randn(2, 4 * 4, 32) for _ in range(4)]
    images = torch.rand(2, 3, 56, 56)
    features = {}
    head.out_conv2.register_forward_pre_hook(lambda _, args: features.update(x=args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(tokens, (4, 4), (56, 56), images).dtype == torch.bfloat16
        with torch.no_grad():
            out = head(tokens, (4, 4), (56, 56), images)
    assert out.dtype == torch.float32
    assert (out != out.bfloat16().float()).float().mean() > 0.9
    with torch.no_grad():
        ref = head.out_conv3(F.relu(head.out_conv2(features["x"].float())))
    torch.testing.assert_close(out, ref)
    plain = DPTHead([32] * 4, [8, 16, 32, 64], 16, 8).to(torch.bfloat16)
    with torch.no_grad():
        low = plain([t.bfloat16() for t in tokens], (4, 4), (56, 56))
    assert low.dtype == torch.float32 and torch.isfinite(low).all()


def test_eval_is_deterministic_and_inference_mode_keeps_no_graph(tiny):
    tiny.eval()
    x = _images(1, 4, 28, 42, seed=3)
    with torch.inference_mode():
        a, b = tiny(x), tiny(x)
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert not a[key].requires_grad and a[key].is_inference()


def test_chunking_does_not_change_outputs(tiny):
    tiny.eval()
    x = _images(2, 3, 28, 28, seed=4)
    with torch.inference_mode():
        tiny.head_chunk_size = 1
        one = tiny(x)
        tiny.head_chunk_size = 100
        all_at_once = tiny(x)
    tiny.head_chunk_size = 3
    for key in one:
        torch.testing.assert_close(one[key], all_at_once[key], rtol=1e-5, atol=1e-5)


def test_view_indices_train_random_eval_ordered(tiny):
    decoder = tiny.decoder
    decoder.eval()
    assert decoder.view_indices(2, 4, torch.device("cpu")).tolist() == [[0, 250, 500, 750]] * 2
    decoder.train()
    torch.manual_seed(1)
    idx = decoder.view_indices(8, 6, torch.device("cpu"))
    assert (idx[:, 0] == 0).all()
    rest = idx[:, 1:]
    assert (rest >= 1).all() and (rest <= 999).all()
    assert (rest[:, 1:] > rest[:, :-1]).all()  # distinct and sorted
    assert not torch.equal(rest, torch.arange(1, 6).expand(8, 5))
    with pytest.raises(ValueError, match="1000"):
        decoder.view_indices(1, 1001, torch.device("cpu"))


def test_eval_view_indices_are_the_mean_of_the_training_draws(tiny):
    """Inference puts views where training puts them on average: each eval index is within
    rounding of the mean of that view's sorted random training indices."""
    decoder = tiny.decoder
    decoder.train()
    torch.manual_seed(0)
    for views in (2, 4, 7):
        drawn = decoder.view_indices(20000, views, torch.device("cpu")).double().mean(0)
        decoder.eval()
        got = decoder.view_indices(1, views, torch.device("cpu"))[0].double()
        decoder.train()
        # an index's spread is at most ~290 (uniform on 1..999), so its mean over 20000
        # draws is within ~2 of the expectation; 4 of those, plus 0.5 of rounding
        assert (got - drawn).abs().max() < 8.5, (views, got, drawn)
        assert got[1] > 100  # not 1, 2, 3...: where training almost never puts view 1


def test_eval_view_indices_distinct_and_increasing_up_to_the_table():
    from distill3r.models.decoder import eval_view_indices

    for table in (2, 3, 10, 97, 1000):
        for views in range(1, table + 1):
            idx = eval_view_indices(views, table)
            assert len(idx) == views and idx[0] == 0
            assert (idx.diff() >= 1).all() and idx[-1] <= table - 1, (table, views, idx)
    assert eval_view_indices(4, 10).tolist() == [0, 3, 5, 8]  # round(2.5, 5, 7.5), halves up
    assert eval_view_indices(1, 1000).tolist() == [0]


def test_eval_view_indices_beyond_the_table():
    from distill3r.models.decoder import eval_view_indices

    assert eval_view_indices(1000, 1000).tolist() == list(range(1000))  # both rules agree at T
    idx = eval_view_indices(1024, 1000)
    assert idx[0] == 0 and idx[1] == 1 and idx[-1] == 999 and len(idx) == 1024
    steps = idx[1:].diff()
    assert ((steps == 0) | (steps == 1)).all()  # in view order, every index 1..999 used
    assert set(idx[1:].tolist()) == set(range(1, 1000))
    assert eval_view_indices(7, 4).tolist() == [0, 1, 1, 2, 2, 3, 3]


def test_more_views_than_the_table_in_eval_mode():
    """An eval-mode forward past the table (here T=4, 7 views) runs and the streamed path
    gives the same maps; train mode still refuses (distinct indices cannot be drawn)."""
    import numpy as np
    from dataclasses import replace

    from distill3r.models.streaming import stream_forward

    torch.manual_seed(0)
    model = Student(replace(get_config("tiny"), max_views=4)).eval()
    x = (torch.rand(1, 7, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).round()
    with torch.inference_mode():
        full = model(x / 255.0)
    got = {}
    stream_forward(model, x[0].permute(0, 2, 3, 1).to(torch.uint8).numpy(), torch.device("cpu"),
                   torch.float32, lambda s, m: got.update({(s, k): v for k, v in m.items()}),
                   view_chunk=3, token_chunk=50)
    for key in full:
        streamed = np.concatenate([got[(s, key)] for s in (0, 3, 6)])
        np.testing.assert_allclose(streamed, full[key][0].numpy(), rtol=1e-4, atol=1e-4)
    model.train()
    with pytest.raises(ValueError, match="training views"):
        model(x[:, :5] / 255.0)


def test_train_mode_outputs_depend_on_view_indices(tiny):
    tiny.train()
    x = _images(1, 3, 28, 28, seed=5)
    with torch.no_grad():
        torch.manual_seed(0)
        a = tiny(x)["xyz_global"]
        torch.manual_seed(0)
        b = tiny(x)["xyz_global"]
        torch.manual_seed(1)
        c = tiny(x)["xyz_global"]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("shape", [(1, 2, 3, 28, 30), (1, 2, 3, 27, 28), (2, 3, 28, 28),
                                   (1, 2, 1, 28, 28)])
def test_rejects_bad_image_shapes(tiny, shape):
    with pytest.raises(ValueError):
        tiny(torch.rand(*shape))


def test_xyz_activation_is_safe_at_zero():
    x = torch.zeros(4, 3, requires_grad=True)
    y = xyz_exp(x)
    y.sum().backward()
    assert torch.equal(y, torch.zeros(4, 3)) and torch.isfinite(x.grad).all()
    v = torch.tensor([[3.0, 4.0, 0.0]])
    torch.testing.assert_close(xyz_exp(v), v / 5 * torch.expm1(torch.tensor(5.0)))
    with pytest.raises(ValueError, match="unknown conf activation"):
        get_activation("conf", "sigmoid")


def test_config_registry_and_strict_round_trip():
    assert set(MODEL_CONFIGS) == {"paper", "tiny", "tiny-lite", "tiny-fine", "tiny-pose",
                                  "tiny-conv", "tiny-skip", "tiny-hybrid", "tiny-pyramid",
                                  "tiny-pyramid-local", "tiny-pyramid-full", "tiny-pyramid-gn",
                                  "tiny-deep", "tiny-fine-pyramid", "micro", "fast3r-large"}
    for name in MODEL_CONFIGS:
        cfg = get_config(name)
        assert StudentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown student config"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown key"):
        StudentConfig.from_dict({**get_config("tiny").to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="unknown global_head"):
        StudentConfig.from_dict({**get_config("tiny").to_dict(), "global_head": "camera"})
    with pytest.raises(ValueError, match="last hook"):
        StudentConfig.from_dict({**get_config("tiny").to_dict(), "hooks": [0, 2, 3, 9]})


def test_save_load_round_trip_identical_outputs(tiny, tmp_path):
    tiny.eval()
    save_student(tiny, tmp_path / "student")
    meta = json.loads((tmp_path / "student" / "config.json").read_text())
    assert meta["num_params"] == count_parameters(tiny)["total"]
    assert len(meta["sha256"]) == 64
    loaded = load_student(tmp_path / "student", device="cpu")
    assert not loaded.training and loaded.config == tiny.config
    x = _images(1, 3, 42, 28, seed=7)
    with torch.inference_mode():
        a, b = tiny(x), loaded(x)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_load_rejects_missing_or_mismatching_files(tiny, tmp_path):
    folder = save_student(tiny, tmp_path / "student")
    with pytest.raises(ValueError, match="config.json"):
        load_student(tmp_path / "nowhere")
    meta = json.loads((folder / "config.json").read_text())
    # a config that does not fit the weights: the error names the differing keys
    bad = dict(meta, config={**meta["config"], "dec_depth": 3, "hooks": [0, 1, 2, 3]})
    (folder / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"unexpected keys: decoder\.blocks\.3\."):
        load_student(folder)
    wider = dict(meta, config={**meta["config"], "dpt_last_dim": 16})
    (folder / "config.json").write_text(json.dumps(wider))
    with pytest.raises(ValueError, match=r"shape mismatches: .*out_conv1\.weight"):
        load_student(folder)
    (folder / "config.json").write_text(json.dumps(dict(meta, config={"name": "x", "bogus": 1})))
    with pytest.raises(ValueError, match="bogus"):
        load_student(folder)
    (folder / "config.json").write_text(json.dumps(dict(meta, sha256="0" * 64)))
    with pytest.raises(ValueError, match="fingerprint"):
        load_student(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        load_student(folder)


def test_rotation_from_6d_is_a_rotation_and_keeps_the_identity():
    rot = rotation_from_6d(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)))
    eye = torch.eye(3).expand(50, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(50), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotation_from_6d(torch.tensor([[2.0, 0, 0, 0.5, 3, 0]])),
                               torch.eye(3)[None])


def test_tiny_fine_and_tiny_pose_change_one_thing_of_tiny_lite():
    lite, fine, pose = (get_config(n).to_dict() for n in ("tiny-lite", "tiny-fine", "tiny-pose"))
    assert {k for k in lite if lite[k] != fine[k]} == {"name", "patch_size"}
    assert fine["patch_size"] == 8
    assert {k for k in lite if lite[k] != pose[k]} == {"name", "global_head"}
    counts = _meta_counts("tiny-pose")
    assert counts["head_global"] < counts["head_local"] / 10  # an MLP, not a DPT head


def _pose_student() -> Student:
    torch.manual_seed(0)
    model = build_student("tiny-pose", head_chunk_size=2).eval()
    with torch.no_grad():  # the untrained head is the identity: give it a real pose to apply
        last = model.head_global.mlp[-1]
        last.weight.normal_(0.0, 0.5)
        last.bias.normal_(0.0, 0.5)
    return model


def test_pose_head_moves_each_local_map_rigidly_and_keeps_view_0():
    model = _pose_student()
    with torch.no_grad():
        out = model(_images(2, 3, 28, 28, seed=1))
    glob, loc = out["xyz_global"], out["xyz_local"]
    torch.testing.assert_close(glob[:, 0], loc[:, 0])  # the global frame is view 0's camera
    assert not torch.allclose(glob[:, 1:], loc[:, 1:], atol=1e-2)
    torch.testing.assert_close(out["conf_global"], out["conf_local"])
    # a similarity: every distance within a view scales by the same factor
    for b in range(2):
        for v in range(1, 3):
            # float64 distances of at least 1e-2: the maps are float32, so a distance of 1e-3
            # between points 1-10 from the origin is only good to ~1e-3 relative
            g = glob[b, v].reshape(-1, 3)[::37].double()
            l = loc[b, v].reshape(-1, 3)[::37].double()
            far = torch.cdist(l, l) > 1e-2
            ratio = torch.cdist(g, g)[far] / torch.cdist(l, l)[far]
            torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-4,
                                       atol=1e-5)


def test_pose_head_untrained_is_the_identity_and_needs_reference_views():
    torch.manual_seed(0)
    model = build_student("tiny-pose").eval()
    with torch.no_grad():
        out = model(_images(1, 3, 28, 28))
    torch.testing.assert_close(out["xyz_global"], out["xyz_local"])
    feats = [torch.zeros(3, 4, 64)] * 4
    with pytest.raises(ValueError, match="needs reference"):
        model.run_heads(feats, (2, 2), (28, 28))


def _assert_streamed_matches_batched(model: Student, views: int, height: int, width: int,
                                    view_chunk: int, keys: tuple[str, ...], seed: int) -> None:
    """``stream_forward`` in chunks of ``view_chunk`` views gives the batched forward's maps."""
    from distill3r.inputs import images_to_input
    from distill3r.models.streaming import stream_forward

    images = (torch.rand(views, height, width, 3, generator=torch.Generator().manual_seed(seed))
              * 255).to(torch.uint8)
    got = {}
    stream_forward(model, images.numpy(), torch.device("cpu"), torch.float32,
                   lambda start, maps: got.update({start: maps}), view_chunk=view_chunk)
    with torch.no_grad():
        want = model(images_to_input(images)[None])
    for key in keys:
        streamed = torch.cat([torch.from_numpy(got[s][key]) for s in sorted(got)])
        torch.testing.assert_close(streamed, want[key][0], atol=1e-4, rtol=1e-4)


def test_pose_head_streamed_views_match_the_batched_forward():
    """Streaming runs the heads in view chunks: only the first chunk holds view 0."""
    _assert_streamed_matches_batched(_pose_student(), 7, 28, 28, view_chunk=3,
                                     keys=("xyz_global",), seed=2)


def _skip_student(name: str = "tiny-skip") -> Student:
    """A ``name`` student whose image branches are switched on (their projections start at 0)."""
    torch.manual_seed(0)
    model = build_student(name, head_chunk_size=3).eval()
    with torch.no_grad():
        for head in (model.head_global, model.head_local):
            for conv in head.image_projections():
                conv.weight.normal_(0.0, 0.3)
    return model


def test_image_branch_starts_silent_then_sees_the_pixels():
    torch.manual_seed(0)
    head = build_student("tiny-skip").eval().head_local
    tokens = [torch.randn(2, 3 * 4, c) for c in (192, 192, 192, 192)]
    a, b = _images(1, 2, 42, 56, seed=1)[0], _images(1, 2, 42, 56, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(head(tokens, (3, 4), (42, 56), a),
                                   head(tokens, (3, 4), (42, 56), b))
        with pytest.raises(ValueError, match="image branch: it needs the views' images"):
            head(tokens, (3, 4), (42, 56))
        skip = _skip_student()
        out_a = skip.head_local(tokens, (3, 4), (42, 56), a)
        out_b = skip.head_local(tokens, (3, 4), (42, 56), b)
    assert out_a.shape == (2, 4, 42, 56)
    assert (out_a - out_b).abs().max() > 1e-3


def test_image_branch_streamed_views_match_the_batched_forward():
    _assert_streamed_matches_batched(_skip_student(), 5, 28, 42, view_chunk=2,
                                     keys=("xyz_global", "xyz_local", "conf_local"), seed=3)


def test_image_pyramid_reaches_the_output_through_each_of_its_four_stages():
    """``tiny-pyramid``: ``tiny-hybrid`` whose image branch has four stages (8h, 4h, 2h, h) of
    residual units; it starts silent, and each stage's projection alone moves the output."""
    pyramid, hybrid = get_config("tiny-pyramid"), get_config("tiny-hybrid")
    assert dataclasses.replace(pyramid, name="tiny-hybrid", dpt_image_blocks=0) == hybrid
    torch.manual_seed(0)
    head = build_student("tiny-pyramid").eval().head_local
    projections = head.image_projections()
    assert [p.in_channels for p in projections] == [16, 32, 64, 128]
    assert all(float(p.weight.abs().sum()) == 0 for p in projections)
    tokens = [torch.randn(2, 3 * 5, 192) for _ in range(4)]
    a, b = _images(1, 2, 42, 70, seed=1)[0], _images(1, 2, 42, 70, seed=2)[0]
    with torch.no_grad():
        base = head(tokens, (3, 5), (42, 70), a)
        torch.testing.assert_close(base, head(tokens, (3, 5), (42, 70), b))
        for k, conv in enumerate(projections):
            conv.weight.normal_(0.0, 0.3)
            out_a = head(tokens, (3, 5), (42, 70), a)
            out_b = head(tokens, (3, 5), (42, 70), b)
            conv.weight.zero_()
            assert out_a.shape == (2, 4, 42, 70)
            # random pixels average out in the coarse stages: small, but not zero
            assert (out_a - out_b).abs().max() > 1e-5, f"stage {k} does not reach the output"


def test_image_pyramid_streams_odd_and_one_column_grids_and_round_trips(tmp_path):
    model = _skip_student("tiny-pyramid")
    _assert_streamed_matches_batched(model, 5, 42, 28, view_chunk=2,
                                     keys=("xyz_global", "xyz_local", "conf_local"), seed=4)
    x = _images(1, 2, 28, 14, seed=5)  # grid 2x1: the coarsest stage is one column wide
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(torch.isfinite(v.float()).all() for v in model(x).values())
    save_student(model, tmp_path / "pyramid")
    loaded = load_student(tmp_path / "pyramid")
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["xyz_local"], model(x)["xyz_local"])


def test_image_pyramid_in_the_local_head_only():
    """``tiny-pyramid-local``: the global head is ``tiny-conv``'s (no image branch, so the pixels
    reach it only through the tokens), the local head has the pyramid."""
    model = _skip_student("tiny-pyramid-local")
    conv = build_student("tiny-conv")
    assert count_parameters(model)["head_global"] == count_parameters(conv)["head_global"]
    assert model.head_global.image_projections() == []
    assert len(model.head_local.image_projections()) == 4
    tokens = [torch.randn(2, 2 * 4, 192) for _ in range(4)]
    a, b = _images(1, 2, 28, 56, seed=1)[0], _images(1, 2, 28, 56, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(model.head_global(tokens, (2, 4), (28, 56), a),
                                   model.head_global(tokens, (2, 4), (28, 56), b))
        moved = model.head_local(tokens, (2, 4), (28, 56), a) - model.head_local(
            tokens, (2, 4), (28, 56), b)
    assert moved.abs().max() > 1e-3
    _assert_streamed_matches_batched(model, 4, 28, 28, view_chunk=3,
                                     keys=("xyz_global", "xyz_local", "conf_local"), seed=6)
    with pytest.raises(ValueError, match="unknown dpt_image_heads 'global'"):
        dataclasses.replace(get_config("tiny-pyramid"), dpt_image_heads="global")


def test_group_norm_in_the_local_head(tmp_path):
    """``tiny-pyramid-gn``: ``tiny-pyramid-local`` whose local head normalises before each ReLU
    of its residual conv units (fusion blocks and image pyramid). Such a unit's residual branch
    ignores the scale of its input; the global head is unchanged; chunked and batched head calls
    agree (the norm is per view); the config round-trips through a saved model folder."""
    gn, local = get_config("tiny-pyramid-gn"), get_config("tiny-pyramid-local")
    assert dataclasses.replace(gn, name="tiny-pyramid-local", dpt_norm="none") == local
    model = _skip_student("tiny-pyramid-gn")  # image branch switched on

    def units(head):
        return [m for m in head.modules() if isinstance(m, ResidualConvUnit)]

    assert len(units(model.head_local)) == 16  # 4 fusion blocks x 2, 4 pyramid stages x 2
    assert all(u.norm1 is not None and u.norm2 is not None for u in units(model.head_local))
    assert all(u.norm1 is None for u in units(model.head_global))
    unit = units(model.head_local)[-1]
    x = torch.randn(2, unit.conv1.in_channels, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(unit(7.0 * x) - 7.0 * x, unit(x) - x, rtol=1e-4, atol=1e-4)
        plain = ResidualConvUnit(unit.conv1.in_channels)
        assert not torch.allclose(plain(7.0 * x) - 7.0 * x, plain(x) - x, atol=1e-2)
    _assert_streamed_matches_batched(model, 4, 28, 28, view_chunk=3,
                                     keys=("xyz_local", "conf_local"), seed=5)
    loaded = load_student(save_student(model, tmp_path / "gn"))
    assert loaded.config == model.config
    with pytest.raises(ValueError, match="unknown dpt_norm 'batch'"):
        dataclasses.replace(local, dpt_norm="batch")


def test_full_resolution_image_branch_reaches_the_output_only_locally(tmp_path):
    """``tiny-pyramid-full``: ``tiny-pyramid-local`` whose local head also sees the pixels at the
    output size. It starts silent; once switched on, a one-pixel change of the image moves the
    output within the branch's 7x7 receptive field (two 3x3 convs, then the output stage's 3x3
    conv), where the pyramid alone, which starts from the image resized to 8/14 of its size,
    spreads it over the whole coarse grid."""
    full, local = get_config("tiny-pyramid-full"), get_config("tiny-pyramid-local")
    assert dataclasses.replace(full, name="tiny-pyramid-local", dpt_image_full=0) == local
    torch.manual_seed(0)
    model = build_student("tiny-pyramid-full").eval()
    head = model.head_local
    assert model.head_global.image_projections() == []
    assert head.image_projections()[-1] is head.full_to_out
    assert float(head.full_to_out.weight.abs().sum()) == 0
    tokens = [torch.randn(2, 2 * 4, 192) for _ in range(4)]
    a = _images(1, 2, 28, 56, seed=1)[0]
    b = a.clone()
    b[:, :, 14, 30] = 1.0 - b[:, :, 14, 30]
    with torch.no_grad():
        for conv in head.image_projections()[:-1]:
            conv.weight.zero_()  # only the full-resolution branch sees the pixels
        torch.testing.assert_close(head(tokens, (2, 4), (28, 56), a),
                                   head(tokens, (2, 4), (28, 56), b))
        head.full_to_out.weight.normal_(0.0, 0.3)
        moved = (head(tokens, (2, 4), (28, 56), a) - head(tokens, (2, 4), (28, 56), b)).abs()
    reach = moved.amax(dim=(0, 1)) > 0
    rows, cols = torch.nonzero(reach, as_tuple=True)
    assert reach[14, 30]
    assert rows.min() >= 11 and rows.max() <= 17 and cols.min() >= 27 and cols.max() <= 33
    _assert_streamed_matches_batched(_skip_student("tiny-pyramid-full"), 4, 28, 28,
                                     view_chunk=3, keys=("xyz_local", "conf_local"), seed=7)
    save_student(model, tmp_path / "full")
    loaded = load_student(tmp_path / "full")
    assert loaded.config == model.config
    x = _images(1, 2, 28, 28, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["xyz_local"], model(x)["xyz_local"])
    with pytest.raises(ValueError, match="dpt_image_full > 0 needs an image branch"):
        dataclasses.replace(get_config("tiny-lite"), dpt_image_full=16)
    with pytest.raises(ValueError, match="dpt_image_full must be >= 0, got -1"):
        dataclasses.replace(local, dpt_image_full=-1)


def test_image_pyramid_needs_an_image_branch():
    with pytest.raises(ValueError, match="dpt_image_blocks > 0 needs an image branch"):
        dataclasses.replace(get_config("tiny-lite"), dpt_image_blocks=2)
    with pytest.raises(ValueError, match="dpt_image_blocks must be >= 0, got -1"):
        dataclasses.replace(get_config("tiny-hybrid"), dpt_image_blocks=-1)


def test_heads_chunk_only_without_autograd(tiny, monkeypatch):
    """Chunks bound memory only when no activations are kept for backward: under autograd the
    heads see all views in one call (the same outputs), without it chunks of head_chunk_size."""
    calls = []
    original = DPTHead.forward

    def spy(self, tokens, *args, **kwargs):
        calls.append(tokens[0].shape[0])
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(DPTHead, "forward", spy)
    tiny.eval()
    tiny.head_chunk_size = 2
    x = _images(2, 3, 28, 28, seed=5)
    with torch.no_grad():
        chunked = tiny(x)
    assert calls == [2, 2, 2, 2, 2, 2]  # 6 views in chunks of 2, global then local head
    calls.clear()
    recorded = tiny(x)
    assert calls == [6, 6]
    assert recorded["xyz_local"].requires_grad
    for key in chunked:
        torch.testing.assert_close(recorded[key].detach(), chunked[key], rtol=1e-5, atol=1e-5)
    tiny.head_chunk_size = 3


@pytest.mark.parametrize("name", ["tiny-pyramid-local", "tiny"])
def test_convolutions_run_channels_last(name):
    """Every convolution (patch embedding or stem, DPT heads, image pyramid) gets a
    channels-last input, the layout oneDNN and cuDNN run bf16 convolutions fastest in."""
    model = build_student(name)
    seen = []
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.register_forward_pre_hook(
                lambda mod, args, n=module_name: seen.append(
                    (n, args[0].is_contiguous(memory_format=torch.channels_last))))
    with torch.no_grad():
        model(_images(1, 2, 56, 56, seed=6))
    assert seen and all(ok for _, ok in seen), [n for n, ok in seen if not ok]
