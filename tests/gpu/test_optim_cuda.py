"""On CUDA the optimiser is torch's fused AdamW (alone or beside Muon), and a bf16 training step
with every loss term (the surface-normal and camera terms included) gives finite gradients."""

from __future__ import annotations

import pytest
import torch

from distill3r.config import LossParams
from distill3r.devices import autocast
from distill3r.losses import DistillationLoss
from distill3r.models import build_student
from distill3r.training.schedule import build_optimizer


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_fused_adamw_step_with_every_loss_term_on_cuda(kind):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_student("tiny-pyramid-local").to(device).train()
    optimizer, _ = build_optimizer(model, 1e-3, [0.9, 0.95], 0.01, 1e-5, 1, 10, fused=True,
                                   kind=kind)
    adamw = optimizer if kind == "adamw" else optimizer.adamw
    assert all(group["fused"] for group in adamw.param_groups)
    images = torch.rand(2, 3, 3, 112, 112, device=device)
    xyz = torch.randn(2, 3, 112, 112, 3, device=device) + torch.tensor([0.0, 0.0, 4.0],
                                                                       device=device)
    target = {"xyz_global": xyz, "xyz_local": xyz,
              "conf_global": torch.full(xyz.shape[:-1], 5.0, device=device),
              "conf_local": torch.full(xyz.shape[:-1], 5.0, device=device),
              "mask": torch.ones(xyz.shape[:-1], dtype=torch.bool, device=device)}
    loss_fn = DistillationLoss(LossParams(alpha_camera=1.0, alpha_normal=0.5))
    before = [p.detach().clone() for p in model.parameters()]
    with autocast(device, torch.bfloat16):
        loss, details = loss_fn(model(images), target)
    loss.backward()
    assert torch.isfinite(loss) and details["loss_normal"] > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
