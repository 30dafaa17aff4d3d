"""The one conversion of views to the student's input.

It lives outside :mod:`distill3r.models` because the cache decodes samples with it: the
``cache`` stage then does not depend on the student's code, so editing the student never
invalidates a teacher cache (hours of GPU time with Fast3R).
"""

from __future__ import annotations

import numpy as np
import torch


def images_to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB views ``[..., H, W, 3]`` (numpy or torch) -> float32 ``[..., 3, H, W]`` in
    [0, 1], the student's input (it normalises with ImageNet statistics itself)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [..., H, W, 3], got {x.dtype} "
                         f"{list(x.shape)}")
    out = torch.empty((*x.shape[:-3], 3, *x.shape[-3:-1]), dtype=torch.float32)
    return out.copy_(x.movedim(-1, -3)).div_(255.0)  # one pass: convert while transposing
