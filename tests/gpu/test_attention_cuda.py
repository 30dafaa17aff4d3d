"""On CUDA every attention runs torch's fused SDPA, short sequences included."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill3r.devices import autocast
from distill3r.models import build_student
from distill3r.models.attention import attend


def test_cuda_attention_is_fused_sdpa_at_demo_sizes():
    device = torch.device("cuda")
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 16, 3, 69, 64, device=device, dtype=torch.bfloat16)
    assert torch.equal(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))
    model = build_student("tiny-deep").to(device).eval()
    with torch.inference_mode(), autocast(device, torch.bfloat16):
        out = model(torch.rand(1, 4, 3, 112, 112, device=device))
    assert all(block.attn.fused_attn for block in model.encoder.vit.blocks)
    assert torch.isfinite(out["xyz_global"].float()).all()
