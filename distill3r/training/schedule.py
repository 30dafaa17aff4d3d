"""Optimiser and learning-rate schedule: AdamW (or Muon for the weight matrices and AdamW for
the rest, :mod:`distill3r.training.muon`) with a no-decay group, warmup then cosine.

Steps are *optimiser* steps (what Lightning counts in ``global_step`` and ``max_steps``): one step
consumes ``devices * num_nodes * batch_size * accumulate_grad_batches`` samples. The schedule
length comes from the trainer (``Trainer.estimated_stepping_batches``), which already accounts
for devices and gradient accumulation, so the cosine really reaches ``min_lr`` at the last step
(the published recipe computed it from the per-GPU batch count and never decayed).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from distill3r.training.muon import MuonAdamW, muon_parameters

# Parameter names (substrings) that never get weight decay: positional embeddings and learned
# tokens are not weights of a linear map, and shrinking them towards zero only hurts.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "register_tokens", "mask_token",
                  "camera_token")
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm,
                    nn.modules.instancenorm._InstanceNorm)


def _no_decay(module: nn.Module, param_name: str, full_name: str, param: torch.Tensor) -> bool:
    if isinstance(module, NO_DECAY_MODULES) or "norm" in type(module).__name__.lower():
        return True
    if param_name == "bias" or param.ndim < 2:
        return True
    return any(key in full_name for key in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """Two AdamW groups: ``decay`` (weight matrices, conv kernels) and ``no_decay`` (norms,
    biases, embeddings, positional embeddings and learned tokens). With ``muon``, a third group
    ``muon`` first: the hidden layers' weight matrices and kernels
    (:func:`~distill3r.training.muon.muon_parameters`), taken out of ``decay``. Frozen
    parameters are left out. Every trainable parameter is in exactly one group."""
    decay, no_decay, matrices = [], [], []
    chosen = muon_parameters(model) if muon else set()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            if _no_decay(module, name, full, param):
                no_decay.append(param)
            elif id(param) in chosen:
                matrices.append(param)
            else:
                decay.append(param)
    first = [{"params": matrices, "weight_decay": weight_decay, "name": "muon"}] if muon else []
    return first + [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warmup from ``1/warmup`` to 1 over steps ``0..warmup_steps-1``, then a cosine from 1
    (step ``warmup_steps``) to ``min_ratio`` (``min_lr / lr``) at the last step
    ``total_steps - 1``; ``min_ratio`` after. ``warmup_steps`` is capped at ``total_steps``.
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min((step - warmup_steps) / max(decay_steps - 1, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fused_supported(model: nn.Module) -> bool:
    """Whether torch's fused AdamW (one kernel per step over all parameters, instead of a few
    per tensor group) can run ``model``'s parameters: floating point, on a CPU or a CUDA GPU.
    Call once the model is on its device (Lightning builds the optimiser after the move)."""
    params = list(model.parameters())
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                for p in params)


def build_optimizer(model: nn.Module, lr: float, betas: Iterable[float], weight_decay: float,
                    min_lr: float, warmup_steps: int, total_steps: int, fused: bool = False,
                    kind: str = "adamw", momentum: float = 0.95, ns_steps: int = 5):
    """AdamW over :func:`param_groups` (``kind="adamw"``), or Muon over the hidden layers' weight
    matrices and kernels and AdamW over the rest (``kind="muon"``, :class:`MuonAdamW`, with Muon's
    ``momentum`` and ``ns_steps``), plus a per-step ``LambdaLR`` of :func:`lr_factor` over
    every group; with ``fused``, torch's fused AdamW kernel where :func:`fused_supported`, else
    torch's default implementation. A fused AdamW unscales fp16 gradients inside its step, so
    with a gradient scaler the caller must not clip or measure gradients before it (Lightning
    refuses to).

    Returns ``(optimizer, scheduler)``. Raises ``ValueError`` for an inconsistent setting.
    """
    betas = tuple(float(b) for b in betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(betas)}")
    if lr <= 0 or min_lr < 0 or min_lr > lr:
        raise ValueError(f"train.lr ({lr}) must be > 0 and train.min_lr ({min_lr}) in [0, lr]")
    if total_steps < 1:
        raise ValueError(f"the schedule needs at least one optimiser step, got {total_steps}")
    if kind not in ("adamw", "muon"):
        raise ValueError(f"train.optimizer must be 'adamw' or 'muon', got {kind!r}")
    fused = (fused and fused_supported(model)) or None
    groups = param_groups(model, weight_decay, muon=kind == "muon")
    if kind == "muon":
        optimizer = MuonAdamW(groups[:1], groups[1:], lr=lr, betas=betas,
                              weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
                              fused=fused)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    ratio = min_lr / lr

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler
