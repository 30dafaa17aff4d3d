"""The attention kernel choice: the plain form computes what fused SDPA computes, and is used
exactly for short key sequences on the CPU (encoder and decoder alike)."""

import pytest
import torch
import torch.nn.functional as F

from distill3r.models import build_student
from distill3r.models.attention import PLAIN_MAX_KEYS, attend, use_plain


@pytest.mark.parametrize("keys", [69, PLAIN_MAX_KEYS, PLAIN_MAX_KEYS + 1])
def test_attend_matches_sdpa(keys):
    g = torch.Generator().manual_seed(keys)
    q = torch.randn(2, 3, 17, 64, generator=g)
    k, v = torch.randn(2, 2, 3, keys, 64, generator=g)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attend(q, k, v), expected, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attend(q.bfloat16(), k.bfloat16(), v.bfloat16())
    torch.testing.assert_close(low.float(), expected, atol=3e-2, rtol=3e-2)


def test_use_plain_only_short_sequences_on_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_plain(cpu, 1) and use_plain(cpu, PLAIN_MAX_KEYS)
    assert not use_plain(cpu, PLAIN_MAX_KEYS + 1)
    assert not use_plain(cuda, 1) and not use_plain(cuda, PLAIN_MAX_KEYS)


def test_encoder_uses_the_plain_form_for_short_sequences_and_sdpa_for_long():
    torch.manual_seed(0)
    student = build_student("micro").eval()
    encoder = student.encoder
    short = torch.rand(2, 3, 56, 56)  # 16 patches + prefix tokens
    encoder(short)
    assert all(not b.attn.fused_attn for b in encoder.vit.blocks)
    long = torch.rand(1, 3, 14 * 17, 14 * 17)  # 289 patches > PLAIN_MAX_KEYS
    encoder(long)
    assert all(b.attn.fused_attn for b in encoder.vit.blocks)
    with torch.no_grad():  # the same tokens either way
        plain = encoder(short)
        for block in encoder.vit.blocks:
            block.attn.fused_attn = True
        fused = encoder.vit.forward_features((short - encoder.mean) / encoder.std)
    torch.testing.assert_close(plain, fused[:, encoder.vit.num_prefix_tokens:], atol=1e-5,
                               rtol=1e-5)
