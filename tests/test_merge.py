"""Token merging in the fusion decoder: exact when off or at ratio 0, shapes, kept views."""

import numpy as np
import pytest
import torch

from distill3r.models import build_student
from distill3r.models.decoder import Block
from distill3r.models.merge import (MAX_RATIO, TokenMerge, merged_block_, merged_decoder_flops,
                                    plan_merge, split_tokens)
from distill3r.models.streaming import stream_forward
from distill3r.flops import decoder_flops

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_student("tiny").eval()


def _images(n: int, size: int = 28) -> torch.Tensor:
    return torch.rand(1, n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _forward(model, x, merge):
    model.decoder.merge = merge
    try:
        with torch.inference_mode():
            return model(x)
    finally:
        model.decoder.merge = None


def test_ratio_zero_equals_the_unmerged_forward_exactly(tiny):
    x = _images(5)
    plain = _forward(tiny, x, None)
    zero = _forward(tiny, x, TokenMerge(ratio=0.0))
    for key in plain:
        assert torch.equal(plain[key], zero[key]), key


def test_merged_block_at_ratio_zero_matches_the_block():
    """The reduced-set machinery itself (reorder, attention, copy back) at ratio 0."""
    torch.manual_seed(0)
    block = Block(24, 3, 4.0).eval()
    x = torch.randn(6 * 16, 24)
    with torch.inference_mode():
        want = block(x[None])[0]
        got = x.clone()
        merged_block_(block, got, 6, 16, TokenMerge(ratio=0.0), token_chunk=7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merging_keeps_shapes_and_changes_outputs(tiny):
    x = _images(6)
    plain = _forward(tiny, x, None)
    merged = _forward(tiny, x, TokenMerge(ratio=0.5))
    for key in plain:
        assert merged[key].shape == plain[key].shape and torch.isfinite(merged[key]).all()
    assert not torch.equal(plain["xyz_global"], merged["xyz_global"])


def test_kept_views_are_neither_merged_away_nor_merged_into():
    torch.manual_seed(0)
    views, p, keep = 5, 16, 2
    merge = TokenMerge(ratio=MAX_RATIO, keep_views=keep)
    x = torch.randn(views * p, 24)
    norm = torch.nn.LayerNorm(24)
    dst, src = split_tokens(views, p, keep, x.device)
    with torch.inference_mode():
        plan = plan_merge(norm, x, views, p, merge, 9, norm(x[dst]))
    assert (plan.merged_src >= keep * p).all() and (plan.merged_into >= keep * p).all()
    kept = torch.arange(keep * p)
    assert torch.equal(plan.source_of[kept], kept)  # own rows, first in the reduced set
    assert len(plan.merged_src) == merge.merged_count(views, p) == round(0.75 * 3 * p)
    assert plan.reduced == views * p - len(plan.merged_src)
    # every token maps to a reduced row; merged ones to their destination's row
    assert torch.equal(plan.source_of[plan.merged_src], plan.merged_into)


def test_streamed_merged_forward_equals_the_merged_forward(tiny):
    x = _images(6)
    images = (x[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    want = _forward(tiny, torch.from_numpy(images).permute(0, 3, 1, 2)[None].float() / 255,
                    TokenMerge(ratio=0.5))
    got = {}
    tiny.decoder.merge = TokenMerge(ratio=0.5)
    try:
        stream_forward(tiny, images, torch.device("cpu"), torch.float32,
                       lambda s, m: got.update({(s, k): v for k, v in m.items()}),
                       view_chunk=4, token_chunk=19)
    finally:
        tiny.decoder.merge = None
    for key in want:
        streamed = np.concatenate([got[(0, key)], got[(4, key)]])
        np.testing.assert_allclose(streamed, want[key][0].numpy(), rtol=1e-4, atol=1e-4)


def test_merging_refuses_gradients_and_bad_settings(tiny):
    tiny.decoder.merge = TokenMerge(ratio=0.5)
    try:
        with pytest.raises(ValueError, match="inference-only"):
            tiny(_images(3))
    finally:
        tiny.decoder.merge = None
    with pytest.raises(ValueError, match="ratio"):
        TokenMerge(ratio=0.8)
    with pytest.raises(ValueError, match="keep_views"):
        TokenMerge(keep_views=0)


def test_merged_flops_fall_with_the_ratio(tiny):
    cfg = tiny.config
    plain = decoder_flops(cfg, 1, 256, 112, 112)
    assert merged_decoder_flops(cfg, 256, 112, 112, TokenMerge(ratio=0.0)) >= plain
    assert merged_decoder_flops(cfg, 256, 112, 112, TokenMerge(ratio=0.5)) < 0.5 * plain


def test_infer_applies_model_merge_params(tmp_path):
    from distill3r.config import InferParams, MergeParams
    from distill3r.data.io import write_image
    from distill3r.inference import run_inference
    from distill3r.models import save_student

    torch.manual_seed(0)
    ckpt = save_student(build_student("tiny"), tmp_path / "student")
    scene = tmp_path / "room"
    scene.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        write_image(scene / f"{i}.png", rng.integers(0, 256, (28, 28, 3), np.uint8))
    params = InferParams(size=28, device="cpu", dtype="fp32", preview_views=1)
    (off,) = run_inference(scene, ckpt, tmp_path / "off", params, merge=MergeParams())
    (on,) = run_inference(scene, ckpt, tmp_path / "on", params,
                          merge=MergeParams(enabled=True, ratio=0.5, keep_views=2))
    assert off["token_merge"] is None
    assert on["token_merge"] == {"ratio": 0.5, "keep_views": 2}
