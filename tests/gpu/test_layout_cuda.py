"""On CUDA the convolutions run channels-last (cuDNN's fastest bf16 layout), and a training
forward (the heads on all views at once) gives what the chunked evaluation forward gives."""

from __future__ import annotations

import torch

from distill3r.devices import autocast
from distill3r.models import build_student


def test_cuda_convolutions_channels_last_and_unchunked_training_forward():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_student("tiny-pyramid-local", head_chunk_size=2).to(device).eval()
    layouts = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.register_forward_pre_hook(lambda mod, args: layouts.append(
                args[0].is_contiguous(memory_format=torch.channels_last)))
    images = torch.rand(2, 4, 3, 112, 112, device=device)
    with autocast(device, torch.bfloat16):
        recorded = model(images)
        with torch.no_grad():
            chunked = model(images)
    assert layouts and all(layouts)
    for key, value in chunked.items():
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(recorded[key].detach(), value, rtol=2e-2, atol=2e-2)


def test_cuda_head_output_stage_is_float32_without_autograd():
    """Under CUDA bf16 autocast a DPT head's output stage runs in float32 without autograd, so
    its raw outputs are not rounded to bf16; with autograd it stays in bf16."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_student("tiny-pyramid-local").to(device).eval()
    raw = []
    model.head_local.register_forward_hook(lambda mod, args, out: raw.append(out))
    images = torch.rand(1, 3, 3, 112, 112, device=device)
    with autocast(device, torch.bfloat16):
        model(images)
        with torch.no_grad():
            model(images)
    assert raw[0].dtype == torch.bfloat16
    assert raw[1].dtype == torch.float32
    assert (raw[1] != raw[1].bfloat16().float()).float().mean() > 0.9
