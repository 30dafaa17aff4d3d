"""Device and precision choices shared by every stage (nothing CPU-only hard-coded)."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if present, else MPS, else CPU; anything else is passed to torch."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 compute is worth using on ``device`` (CUDA with bf16, or any CPU: AMX/AVX512
    machines run bf16 matmuls natively and others still emulate it correctly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"|"fp16"|"fp32"`` (and torch spellings) -> ``torch.dtype``."""
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32,
             "32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for ``dtype`` on ``device``; a no-op for fp32 or unsupported bf16."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and not bf16_supported(device)):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
