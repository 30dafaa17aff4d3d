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
