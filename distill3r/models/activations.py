"""Output activations of the DPT heads, chosen by name.

- points ``"exp"``: ``xyz / |xyz| * expm1(|xyz|)`` (direction kept, distance grows
  exponentially; 0 maps to 0 with a finite gradient); ``"linear"``: identity.
- confidence ``"expp1"``: ``1 + exp(x)`` (always >= 1, so a threshold below 1 filters nothing).

Norms use ``(x*x).sum(-1).clamp_min(eps).sqrt()``: ``torch.linalg.vector_norm`` over a last
dimension of 3 is pathologically slow on some CPUs.
"""

from __future__ import annotations

from typing import Callable

import torch

_EPS = 1e-12


def point_norm(x: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Euclidean norm over the last dimension, keepdim, >= sqrt(eps) (safe gradient at 0)."""
    return (x * x).sum(-1, keepdim=True).clamp_min(eps).sqrt()


def xyz_exp(x: torch.Tensor) -> torch.Tensor:
    """``[..., 3] -> [..., 3]``: ``x / |x| * expm1(|x|)``."""
    d = point_norm(x)
    return x * (torch.expm1(d) / d)


def xyz_linear(x: torch.Tensor) -> torch.Tensor:
    return x


def conf_expp1(x: torch.Tensor) -> torch.Tensor:
    """``[...] -> [...]``: ``1 + exp(x)``."""
    return 1.0 + torch.exp(x)


_XYZ = {"exp": xyz_exp, "linear": xyz_linear}
_CONF = {"expp1": conf_expp1}


def get_activation(kind: str, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``kind`` is ``"xyz"`` or ``"conf"``; ``ValueError`` for an unknown kind or name."""
    table = {"xyz": _XYZ, "conf": _CONF}.get(kind)
    if table is None:
        raise ValueError(f"unknown activation kind {kind!r}; use 'xyz' or 'conf'")
    if name not in table:
        raise ValueError(f"unknown {kind} activation {name!r}; choose from {sorted(table)}")
    return table[name]
