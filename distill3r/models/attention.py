"""Multi-head attention kernel choice: torch's fused SDPA, or plain ``softmax(QK^T / sqrt(d)) V``
on the CPU for short key sequences.

On the CPU, torch's fused SDPA kernel (the flash kernel, blocked per thread) is slow for short
sequences in bf16, above all its backward pass. Measured on a 2-core AVX512-BF16 CPU (torch 2.x,
forward + backward, heads of 64): 16 x 3 heads x 69 tokens (the demo's per-view attention)
8.1 ms fused against 2.0 ms plain; 4 x 3 x 256 (the demo's global attention) 6.9 against 4.1;
in float32 the two are within a few percent up to 512 keys. From ~1000 keys on, the plain form
is slower and its ``L x L`` score matrix grows quadratically, so the fused kernel (constant
memory per thread) is kept there. On CUDA the fused kernels (flash, memory-efficient) are
always better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PLAIN_MAX_KEYS", "use_plain", "attend"]

PLAIN_MAX_KEYS = 256  # keys up to which the plain form runs on the CPU


def use_plain(device: torch.device, keys: int) -> bool:
    """Whether attention over ``keys`` keys on ``device`` runs the plain form."""
    return device.type == "cpu" and keys <= PLAIN_MAX_KEYS


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[..., Lq, d]``, ``[..., Lk, d]``, ``[..., Lk, d]`` -> ``[..., Lq, d]``: what
    ``F.scaled_dot_product_attention(q, k, v)`` computes (no mask, no dropout), with the kernel
    of :func:`use_plain`."""
    if not use_plain(q.device, k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v
