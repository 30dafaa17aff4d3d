"""Strict state-dict comparison with an error that names every differing key."""

from __future__ import annotations

import torch
from torch import nn


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``ValueError`` listing missing / unexpected keys and shape mismatches, if any."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k} (file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {', '.join(mismatched)}")
    if problems:
        raise ValueError(f"{source}: weights do not match the model; " + "; ".join(problems))
