"""The student's forward over many views in bounded memory (inference only).

:func:`stream_forward` computes what ``Student.forward`` computes for one scene (batch 1,
``eval()`` mode and its image indices), in pieces, and hands the four maps to a callback one
view chunk at a time instead of returning them:

1. the encoder runs on ``view_chunk`` views at a time; its output tokens (hook 0) are kept;
2. the fusion decoder keeps, for all ``N*P`` tokens, only its running state, the hooked block
   outputs and, inside each block, the attention keys and values. Everything else (LayerNorms,
   queries, attention over all keys (:func:`~distill3r.models.attention.attend`), the output
   projection, the MLP) runs on ``token_chunk`` tokens at a time: a chunk's queries are
   computed from its tokens before they are updated, so the block's result is the same as
   over all tokens.
   With ``model.decoder.merge`` set, each block runs
   :func:`distill3r.models.merge.merged_block_` instead (token merging, same chunking); image
   indices follow :func:`distill3r.models.decoder.eval_view_indices` (any ``N``);
3. the two DPT heads run on ``view_chunk`` views at a time; each chunk's maps (float32 numpy)
   go to ``sink(start, maps)`` and are dropped.

Kept token maps are in the compute dtype: bf16/fp16 under autocast (the dtype the decoder
produces there anyway, so nothing is lost), float32 otherwise. At the ``paper`` size (384-wide
tokens, 1036 tokens for a 392x518 view) one token map is 0.8 MB per view in bf16; the peak
holds six (encoder output, two earlier hooks, the running state, keys, values): ~4.8 MB per
view, plus the model and one chunk's activations.

Attention memory: on CUDA, SDPA picks its flash or memory-efficient kernel; on the CPU torch
2.14 runs its flash kernel (no mask, no dropout) whose buffers are per-thread blocks: a
4096-query chunk against 65,536 keys allocates ~5 MB (measured peak RSS), where the plain
``softmax(QK^T)V`` would need 3.2 GB (:func:`~distill3r.models.attention.attend` uses the plain
form only up to 256 keys).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distill3r.devices import autocast
from distill3r.inputs import images_to_input
from distill3r.models.attention import attend
from distill3r.models.decoder import Block, FusionDecoder, eval_view_indices
from distill3r.models.merge import merged_block_

Sink = Callable[[int, dict[str, np.ndarray]], None]


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def token_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype kept token maps are stored in: ``dtype`` where autocast runs in it, else
    float32."""
    with autocast(device, dtype):
        active = torch.is_autocast_enabled(device.type)
    return dtype if active and dtype != torch.float32 else torch.float32


def encode_views(model, images: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype,
                 view_chunk: int) -> torch.Tensor:
    """Encoder over ``images`` (``[N,H,W,3]`` uint8, indexable by view slices: an array or a
    :class:`distill3r.mapstore.StoredArray`) -> tokens ``[N, P, enc_dim]`` on ``device`` in
    :func:`token_dtype`."""
    n = len(images)
    out = None
    for start, stop in _chunks(n, view_chunk):
        x = images_to_input(np.ascontiguousarray(images[start:stop])).to(device)
        with autocast(device, dtype):
            tokens = model.encoder(x)
        if out is None:
            out = torch.empty(n, *tokens.shape[1:], dtype=token_dtype(device, dtype),
                              device=device)
        out[start:stop] = tokens
    return out


def _block_inplace(block: Block, x: torch.Tensor, token_chunk: int) -> None:
    """``x [L, D]`` <- ``block(x[None])[0]``, holding only keys and values for all tokens."""
    length, dim = x.shape
    heads = block.attn.heads
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    k = torch.empty(1, heads, length, dim // heads, dtype=x.dtype, device=x.device)
    v = torch.empty_like(k)
    for start, stop in _chunks(length, token_chunk):
        kv = F.linear(block.norm1(x[start:stop]), w[dim:], b[dim:])
        kv = kv.view(stop - start, 2, heads, dim // heads)
        k[0, :, start:stop] = kv[:, 0].transpose(0, 1)
        v[0, :, start:stop] = kv[:, 1].transpose(0, 1)
        del kv
    for start, stop in _chunks(length, token_chunk):
        chunk = x[start:stop]
        q = F.linear(block.norm1(chunk), w[:dim], b[:dim])
        q = q.view(stop - start, heads, dim // heads).transpose(0, 1)[None]
        att = attend(q, k, v)[0].transpose(0, 1)
        chunk += block.attn.proj(att.reshape(stop - start, dim))
        chunk += block.mlp(block.norm2(chunk))
        del q, att


def decode_tokens(decoder: FusionDecoder, enc: torch.Tensor, blocks: list[int],
                  device: torch.device, dtype: torch.dtype, view_chunk: int,
                  token_chunk: int) -> list[torch.Tensor]:
    """``FusionDecoder.forward`` for one scene in eval mode: ``enc [N, P, enc_dim]`` ->
    one ``[N, P, dec_dim]`` tensor per requested block (1-based; the last block normed)."""
    if decoder.training:
        raise ValueError("stream_forward needs the model in eval() mode")
    n, p, _ = enc.shape
    table = decoder.index_table[eval_view_indices(n, decoder.max_views).to(device)]
    with autocast(device, dtype):
        x = None
        for start, stop in _chunks(n, view_chunk):
            y = decoder.proj(enc[start:stop])
            y = y + table[start:stop][:, None, :].to(y.dtype)
            if x is None:
                x = torch.empty(n, p, y.shape[-1], dtype=enc.dtype, device=device)
            x[start:stop] = y
        x = x.view(n * p, -1)
        outputs = []
        last = len(decoder.blocks)
        merging = decoder.merging(n, p)
        for i, block in enumerate(decoder.blocks[: max(blocks)], start=1):
            if merging:
                merged_block_(block, x, n, p, decoder.merge, token_chunk)
            else:
                _block_inplace(block, x, token_chunk)
            if i not in blocks:
                continue
            if i == last:  # nothing runs after the last block: normalise in place
                for start, stop in _chunks(n * p, token_chunk):
                    x[start:stop] = decoder.norm(x[start:stop])
                outputs.append(x.view(n, p, -1))
            else:
                outputs.append(x.clone().view(n, p, -1))
        return outputs


@torch.inference_mode()
def stream_forward(model, images: Sequence[np.ndarray], device: torch.device,
                   dtype: torch.dtype, sink: Sink, view_chunk: int = 8,
                   token_chunk: int = 8192) -> None:
    """Run ``model`` (a :class:`distill3r.models.Student` in eval mode, on ``device``) on one
    scene's ``images [N,H,W,3]`` uint8 and call ``sink(start, maps)`` for consecutive view
    chunks, ``maps`` holding float32 numpy ``xyz_global, xyz_local [v,H,W,3]``, ``conf_global,
    conf_local [v,H,W]`` for views ``start..start+v-1``."""
    if view_chunk < 1 or token_chunk < 1:
        raise ValueError(f"view_chunk and token_chunk must be >= 1, got {view_chunk}, "
                         f"{token_chunk}")
    n, height, width = len(images), *images.shape[1:3]
    patch = model.patch_size
    if n == 0 or height % patch or width % patch:
        raise ValueError(f"images {tuple(images.shape)}: need >= 1 view and sizes that are "
                         f"multiples of the patch size {patch}")
    grid = (height // patch, width // patch)
    hooks = list(model.config.hooks)
    enc = encode_views(model, images, device, dtype, view_chunk)
    dec = iter(decode_tokens(model.decoder, enc, [k for k in hooks if k > 0], device, dtype,
                             view_chunk, token_chunk))
    feats = [enc if k == 0 else next(dec) for k in hooks]
    for start, stop in _chunks(n, view_chunk):
        with autocast(device, dtype):
            reference = torch.arange(start, stop, device=feats[0].device) == 0
            pixels = (images_to_input(np.ascontiguousarray(images[start:stop])).to(device)
                      if model.config.dpt_image_dim else None)
            maps = model.run_heads([f[start:stop] for f in feats], grid, (height, width),
                                   reference, pixels)
        sink(start, {k: v.cpu().numpy() for k, v in maps.items()})
