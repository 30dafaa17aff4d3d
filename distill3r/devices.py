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
    """The one bf16 policy: bf16 is used where it runs natively on ``device`` (CUDA with bf16,
    or a CPU with AVX512-BF16/AMX through oneDNN); elsewhere emulated bf16 is slower than fp32
    and the stages fall back to fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(check()) if check is not None else False
        except RuntimeError:
            return False
    return False


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"|"fp16"|"fp32"`` (and torch spellings) -> ``torch.dtype``."""
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32,
             "32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return table[name]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """:func:`parse_dtype`, with bf16 replaced by fp32 where :func:`bf16_supported` says no."""
    dtype = parse_dtype(name)
    if dtype == torch.bfloat16 and not bf16_supported(device):
        return torch.float32
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for ``dtype`` on ``device``; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
