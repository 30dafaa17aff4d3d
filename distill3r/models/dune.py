"""Load a DUNE ViT-S/14 checkpoint (``dune_vitsmall14_448.pth``) into the timm encoder.

The file is ``{"model": state_dict, "args": argparse.Namespace}``. Upstream training
(naver/dune ``main_dune.py``) puts numpy arrays (the learning-rate and EMA schedules) into
``args`` before saving, so the file is read with ``torch.load(weights_only=True)`` with exactly
``argparse.Namespace`` and numpy's array/scalar reconstruction and ``dtype`` allow-listed (under
both the numpy 1.x ``numpy.core`` and numpy 2 ``numpy._core`` module names); any other pickled
type is refused and named in a ``ValueError`` (never a fallback to full unpickling), and a file
that is not a torch checkpoint at all says so.

Key conversion (:func:`dune_to_timm`), DUNE/DINOv2 layout -> timm ``VisionTransformer``:
- keep ``encoder.*`` (after stripping any ``module.`` / ``_orig_mod.`` prefixes) and drop the
  prefix; ``projectors.*``, ``teacher_norms.*`` etc. are ignored;
- ``blocks.<chunk>.<i>.`` -> ``blocks.<i>.`` (DINOv2 block chunks); ``register_tokens`` ->
  ``reg_token``; ``mask_token`` dropped;
- DINOv2 adds ``pos_embed[:, 0]`` to the CLS token while timm's ``no_embed_class`` layout has no
  CLS position: ``cls_token := cls_token + pos_embed[:, :1]`` and ``pos_embed := pos_embed[:, 1:]``
  (``[1, 1025, 384]`` -> ``[1, 1024, 384]``).
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill3r.models.statedict import check_state_dict


def _allowed_globals() -> list:
    """``argparse.Namespace`` plus what numpy arrays and scalars inside ``args`` unpickle to."""
    multiarray = np._core.multiarray
    allowed: list = [argparse.Namespace, np.ndarray, np.dtype]
    # numpy 2 pickles a dtype as its class (numpy.dtypes.Float64DType, ...): numeric ones only
    allowed += [type(np.dtype(c)) for c in np.typecodes["All"] if c not in "OMmSUV"]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}")]
    return allowed


_ALLOWED = _allowed_globals()
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _refused_types(path: Path, exc: Exception) -> list[str]:
    """Names of the pickled globals torch refused (from the archive, else from the message)."""
    allowed = {t[1] if isinstance(t, tuple) else f"{t.__module__}.{t.__qualname__}"
               for t in _ALLOWED}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        names = [n for n in names if n not in allowed]
    except Exception:  # not a zip archive: fall back to the error text
        names = []
    found = re.findall(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(exc))
    return names or sorted({a or b for a, b in found}) or ["<unknown>"]


def read_dune_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of a DUNE checkpoint (or the file itself if it is a bare
    state dict), loaded on the CPU without unpickling anything but tensors, plain containers,
    ``argparse.Namespace`` and numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: DUNE checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable torch checkpoint (not the zip archive "
                         "torch.save writes)")
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_types(path, exc)
        raise ValueError(
            f"{path}: refused to unpickle type(s) {', '.join(refused)} (only tensors, plain "
            "containers, argparse.Namespace and numpy arrays are allowed)") from exc
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for a foreign file
        raise ValueError(f"{path}: not a readable torch checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected {{'model': state_dict}} or a bare state dict")
    return state


def dune_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert DUNE encoder keys to the timm layout (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = _strip_wrappers(key)
        if not key.startswith("encoder."):
            continue
        key = _strip_wrappers(key[len("encoder."):])
        if key == "mask_token":
            continue
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        if key == "register_tokens":
            key = "reg_token"
        out[key] = value
    if "pos_embed" in out and "cls_token" in out:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:].contiguous()
    return out


def load_dune_encoder(vit: nn.Module, path: str | Path) -> None:
    """Load the DUNE checkpoint at ``path`` strictly into a timm ``VisionTransformer``."""
    state = dune_to_timm(read_dune_checkpoint(path))
    if not state:
        raise ValueError(f"{path}: no 'encoder.*' tensors found")
    check_state_dict(vit, state, str(path))
    vit.load_state_dict(state, strict=True)
