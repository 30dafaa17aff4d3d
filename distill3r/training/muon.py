"""Muon for the hidden weight matrices and convolution kernels, AdamW for the rest, as one
optimiser.

Muon (Keller Jordan, 2024) takes a Nesterov momentum of the gradient and replaces it by the
nearest semi-orthogonal matrix, approximated by a quintic Newton-Schulz iteration with the
coefficients ``(3.4445, -4.775, 2.0315)`` (those of torch's ``torch.optim.Muon``,
pytorch/pytorch ``torch/optim/_muon.py`` ``_zeropower_via_newtonschulz``, which takes 2-D
parameters only; this module also takes convolution kernels and batches the matrices of one
shape): every direction of the update moves by about the same
amount, however unevenly the gradient's singular values are spread. It is meant for the hidden
layers; a layer that reads the 3-channel image, the layer that writes a head's output and every
bias, norm, embedding and learned token stay with AdamW. A convolution kernel ``[O, I, k, k]``
is orthogonalised as the ``O x (I k k)`` matrix it applies (as Muon's convolutional speedruns
do), a transposed convolution's ``[I, O, k, k]`` as ``I x (O k k)``.

Muon's step is scaled by ``0.2 * sqrt(max(A, B))`` for an ``A x B`` matrix (Moonshot AI, "Muon
is Scalable for LLM Training", 2025; torch's ``adjust_lr_fn="match_rms_adamw"``): its updates
then have the RMS of a typical AdamW update, so both halves share ``train.lr``,
``train.weight_decay`` (decoupled) and the warmup-cosine schedule.

The iteration runs on all matrices of one shape at once (batched matrix products) in bf16 where
the device computes bf16 natively, else in float32.

:class:`MuonAdamW` is one :class:`torch.optim.Optimizer` for Lightning, the learning-rate
scheduler, gradient clipping and a gradient scaler: its ``param_groups`` are the groups of an
inner :class:`Muon` followed by those of an inner ``torch.optim.AdamW`` (the same dicts, so a
scheduler that sets ``group["lr"]`` steers both), and its state dict holds both inner state
dicts. Under DDP every rank orthogonalises the same all-reduced gradient; sharded strategies
(FSDP, DeepSpeed) split matrices across ranks, which Muon cannot orthogonalise: the config
refuses them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from distill3r.devices import bf16_supported
from distill3r.models.dpt import DPTHead
from distill3r.models.pose_head import PoseHead

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
MUON_STATE_KEYS = ("muon", "adamw")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d)
_IMAGE_CHANNELS = 3


def output_layers(model: nn.Module) -> set[int]:
    """``id``s of the layers that write a head's output: each DPT head's last 1x1 conv (points
    and confidence) and the pose head's last linear layer (its 10 pose numbers)."""
    found: set[int] = set()
    for module in model.modules():
        if isinstance(module, DPTHead):
            found.add(id(module.out_conv3))
        elif isinstance(module, PoseHead):
            found.add(id(module.mlp[-1]))
    return found


def muon_parameters(model: nn.Module) -> set[int]:
    """``id``s of the weights Muon trains: those of the linear and convolution layers, except
    a layer reading the 3-channel image (its input is pixels, not features) and the layers of
    :func:`output_layers`."""
    outputs = output_layers(model)
    chosen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, _LAYERS) or id(module) in outputs:
            continue
        if not isinstance(module, nn.Linear) and module.in_channels == _IMAGE_CHANNELS:
            continue
        if module.weight.requires_grad:
            chosen.add(id(module.weight))
    return chosen


def orthogonalise(updates: torch.Tensor, steps: int) -> torch.Tensor:
    """``[K, A, B]`` -> ``[K, A, B]`` (the input's dtype): each matrix replaced by about its
    nearest semi-orthogonal matrix by ``steps`` quintic Newton-Schulz iterations: ``U S' V^T``
    where ``U S V^T`` is its SVD and ``S'`` lies between about 0.5 and 1.2 (lower for singular
    values hundreds of times below the largest)."""
    a, b, c = NS_COEFFICIENTS
    dtype = torch.bfloat16 if bf16_supported(updates.device) else torch.float32
    x = updates.to(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.flatten(1).norm(dim=1).clamp_min(1e-7)[:, None, None]  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return (x if wide else x.mT).to(updates.dtype)


class Muon(torch.optim.Optimizer):
    """Muon over parameters of at least two dimensions (each seen as ``shape[0] x rest``).

    Per group: ``lr``, ``weight_decay`` (decoupled, ``p *= 1 - lr * weight_decay``),
    ``momentum`` (Nesterov), ``ns_steps``. State per parameter: ``momentum_buffer``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0,
                 momentum: float = 0.95, ns_steps: int = 5) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if not 1 <= ns_steps < 100:
            raise ValueError(f"Muon ns_steps must be in [1, 99], got {ns_steps}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay,
                                  "momentum": momentum, "ns_steps": ns_steps})
        for group in self.param_groups:
            flat = [p for p in group["params"] if p.ndim < 2]
            if flat:
                raise ValueError(f"Muon trains matrices and kernels only, got a parameter of "
                                 f"shape {tuple(flat[0].shape)}")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            momentum = group["momentum"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            nesterov = torch._foreach_lerp(grads, buffers, momentum)
            by_shape: dict[tuple, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[(p.shape[0], p[0].numel(), p.device, p.dtype)].append(i)
            lr, decay = group["lr"], group["weight_decay"]
            if decay:
                torch._foreach_mul_(params, 1 - lr * decay)
            for (rows, cols, _, _), members in by_shape.items():
                stacked = torch.stack([nesterov[i].reshape(rows, cols) for i in members])
                ortho = orthogonalise(stacked, group["ns_steps"])
                scale = -lr * 0.2 * math.sqrt(max(rows, cols))
                for k, i in enumerate(members):
                    params[i].add_(ortho[k].view_as(params[i]), alpha=scale)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """:class:`Muon` over ``muon_groups``, AdamW over ``adamw_groups`` (lists of param-group
    dicts, each with ``params`` and optionally ``weight_decay``, ``name``).

    Args:
        lr, weight_decay: defaults of both halves (Muon's step is RMS-matched to AdamW's).
        betas: AdamW's; Muon uses ``momentum`` (Nesterov) instead.
        ns_steps: Newton-Schulz iterations per Muon step.
        fused: torch's fused AdamW kernel for the AdamW half.
    """

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], lr: float,
                 betas: tuple[float, float], weight_decay: float, momentum: float = 0.95,
                 ns_steps: int = 5, fused: Optional[bool] = None) -> None:
        if not any(g["params"] for g in muon_groups):
            raise ValueError("Muon got no weight matrices or kernels to train: use "
                             "train.optimizer: adamw")
        self.muon = Muon(muon_groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         ns_steps=ns_steps)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas,
                                       weight_decay=weight_decay, fused=fused)
        groups = self.muon.param_groups + self.adamw.param_groups
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self.param_groups = groups  # the inner optimisers' own dicts, not copies
        self._built = True

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):  # it would reach neither inner optimiser
            raise NotImplementedError("MuonAdamW takes its parameter groups when it is built")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = self.muon.step(closure)  # runs the closure before its update
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {key: getattr(self, key).state_dict() for key in MUON_STATE_KEYS}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = [k for k in MUON_STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"not a Muon+AdamW optimiser state (missing {missing}): the "
                             f"checkpoint was trained with another train.optimizer")
        for key in MUON_STATE_KEYS:
            getattr(self, key).load_state_dict(state_dict[key])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):  # the inner optimisers hold it; merged (same per-parameter dicts)
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value) -> None:  # Optimizer.__init__ assigns an empty state
        if value:
            raise AttributeError("MuonAdamW's state lives in its inner optimisers")
