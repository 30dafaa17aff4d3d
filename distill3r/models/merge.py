"""Training-free token merging in the fusion decoder's global attention (inference only).

The idea is FastVGGT's (arXiv 2509.02560): at many views most tokens have a near-duplicate in
another view, so attention can run on fewer tokens and its output be copied back. This module
is this project's own bipartite (ToMe-style) version, applied inside every decoder block of
one scene's ``L = N*P`` tokens ``x [L, D]``:

1. ``h = norm1(x)``. Kept tokens: every token of the first ``keep_views`` views (view 0
   always: the reference frame is never merged, neither away nor into). Destination tokens:
   every ``DST_EVERY``-th token (in raster order) of every other view. Source tokens: the rest.
2. Each source token's most similar destination (cosine similarity of ``h``) and its score;
   the ``round(ratio * (N - keep_views) * P)`` best-scoring sources are merged: their
   destination's ``h`` becomes the mean of itself and the sources merged into it. The reduced
   set is ``[kept, destinations, unmerged sources]``, ``L' = L - merged``.
3. Attention (qkv, :func:`~distill3r.models.attention.attend` over the ``L'`` keys, output
   projection) runs on the reduced set; every original token gets the output of the reduced
   token it was merged into (itself when unmerged), added to its own residual stream. The
   residual stream and the MLP are never merged, so every token keeps its identity between
   blocks.

Attention cost drops by about ``(1 - ratio)^2``; the similarity search adds
``2 * sources * destinations * D`` FLOPs per block. Ratio 0 (or merging off) takes the plain
path and is exact. No proportional attention (a merged key counts once).

Memory: everything runs on ``token_chunk`` tokens at a time outside the reduced ``h``, keys
and values (``3 L'`` token maps) and the float32 destination sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill3r.models.attention import attend

DST_EVERY = 4  # every 4th token of a non-kept view is a destination: ratio <= 0.75
MAX_RATIO = 1.0 - 1.0 / DST_EVERY


@dataclass(frozen=True)
class TokenMerge:
    """Merging settings: ``ratio`` of the tokens of views ``keep_views..N-1`` merged away per
    block (0 <= ratio <= :data:`MAX_RATIO`), the first ``keep_views`` (>= 1) views kept."""

    ratio: float = 0.5
    keep_views: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= MAX_RATIO:
            raise ValueError(f"token merging ratio must be in [0, {MAX_RATIO}], got {self.ratio}")
        if self.keep_views < 1:
            raise ValueError(f"token merging keep_views must be >= 1, got {self.keep_views}")

    def merged_count(self, views: int, tokens_per_view: int) -> int:
        """Tokens merged away per block for a scene of ``views`` views."""
        others = max(0, views - self.keep_views)
        sources = others * (tokens_per_view - len(range(0, tokens_per_view, DST_EVERY)))
        return min(sources, round(self.ratio * others * tokens_per_view))


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def split_tokens(views: int, tokens_per_view: int, keep_views: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dst [nd], src [ns])`` int64 token indices into ``[N*P]``; ``dst`` starts with the
    ``keep_views * P`` kept tokens, which are never merge targets (see the module docstring)."""
    j = torch.arange(views * tokens_per_view, device=device)
    is_dst = (j < keep_views * tokens_per_view) | (j % tokens_per_view % DST_EVERY == 0)
    return j[is_dst], j[~is_dst]


@dataclass
class MergePlan:
    """Where each of the ``L`` tokens goes: ``dst [nd]``, ``kept_src [ns - m]`` (the order of
    the reduced set), ``merged_src [m]`` with ``merged_into [m]`` (indices into ``dst``), and
    ``source_of [L]`` (each token's row in the reduced set)."""

    dst: torch.Tensor
    kept_src: torch.Tensor
    merged_src: torch.Tensor
    merged_into: torch.Tensor
    source_of: torch.Tensor

    @property
    def reduced(self) -> int:
        return len(self.dst) + len(self.kept_src)


def plan_merge(norm, x: torch.Tensor, views: int, tokens_per_view: int, merge: TokenMerge,
               token_chunk: int, dst_h: torch.Tensor) -> MergePlan:
    """The :class:`MergePlan` for tokens ``x [L, D]``; ``dst_h [nd, D]`` holds ``norm(x)`` of
    ``dst`` (:func:`split_tokens`: kept tokens first, never targets) and is left unchanged."""
    dst, src = split_tokens(views, tokens_per_view, merge.keep_views, x.device)
    kept = min(views, merge.keep_views) * tokens_per_view
    keys = F.normalize(dst_h[kept:].float(), dim=-1).to(dst_h.dtype)
    score = torch.empty(len(src), dtype=torch.float32, device=x.device)
    target = torch.empty(len(src), dtype=torch.int64, device=x.device)
    step = max(1, min(token_chunk, (1 << 24) // max(1, len(dst))))  # <= 16M similarities
    for start, stop in _chunks(len(src), step):
        h = F.normalize(norm(x[src[start:stop]]).float(), dim=-1).to(keys.dtype)
        best = (h @ keys.T).max(dim=-1)
        score[start:stop], target[start:stop] = best.values.float(), best.indices + kept
    m = merge.merged_count(views, tokens_per_view)
    order = torch.argsort(score, descending=True, stable=True)
    merged, kept = order[:m].sort().values, order[m:].sort().values
    source_of = torch.empty(len(x), dtype=torch.int64, device=x.device)
    source_of[dst] = torch.arange(len(dst), device=x.device)
    source_of[src[kept]] = len(dst) + torch.arange(len(kept), device=x.device)
    source_of[src[merged]] = target[merged]
    return MergePlan(dst, src[kept], src[merged], target[merged], source_of)


def merged_block_(block, x: torch.Tensor, views: int, tokens_per_view: int, merge: TokenMerge,
                  token_chunk: int) -> None:
    """``x [L, D]`` <- one decoder ``block`` with merged global attention, in place (see the
    module docstring); inference only."""
    length, dim = x.shape
    heads = block.attn.heads
    dst, _ = split_tokens(views, tokens_per_view, merge.keep_views, x.device)
    sums = torch.empty(len(dst), dim, dtype=torch.float32, device=x.device)
    for start, stop in _chunks(len(dst), token_chunk):
        sums[start:stop] = block.norm1(x[dst[start:stop]]).float()
    plan = plan_merge(block.norm1, x, views, tokens_per_view, merge, token_chunk,
                      sums.to(x.dtype))
    counts = torch.ones(len(dst), dtype=torch.float32, device=x.device)
    counts.index_add_(0, plan.merged_into, torch.ones(len(plan.merged_into), device=x.device))
    for start, stop in _chunks(len(plan.merged_src), token_chunk):
        part = block.norm1(x[plan.merged_src[start:stop]]).float()
        sums.index_add_(0, plan.merged_into[start:stop], part)
    h = torch.empty(plan.reduced, dim, dtype=x.dtype, device=x.device)
    h[: len(dst)] = sums / counts[:, None]
    del sums, counts
    for start, stop in _chunks(len(plan.kept_src), token_chunk):
        h[len(dst) + start: len(dst) + stop] = block.norm1(x[plan.kept_src[start:stop]])
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    k = torch.empty(1, heads, plan.reduced, dim // heads, dtype=x.dtype, device=x.device)
    v = torch.empty_like(k)
    for start, stop in _chunks(plan.reduced, token_chunk):
        kv = F.linear(h[start:stop], w[dim:], b[dim:]).view(stop - start, 2, heads, -1)
        k[0, :, start:stop] = kv[:, 0].transpose(0, 1)
        v[0, :, start:stop] = kv[:, 1].transpose(0, 1)
    for start, stop in _chunks(plan.reduced, token_chunk):  # h's rows become attention outputs
        q = F.linear(h[start:stop], w[:dim], b[:dim]).view(stop - start, heads, -1)
        att = attend(q.transpose(0, 1)[None], k, v)[0].transpose(0, 1)
        h[start:stop] = block.attn.proj(att.reshape(stop - start, dim))
    del k, v
    for start, stop in _chunks(length, token_chunk):
        chunk = x[start:stop]
        chunk += h[plan.source_of[start:stop]]
        chunk += block.mlp(block.norm2(chunk))


def merged_decoder_flops(cfg, views: int, height: int, width: int, merge: TokenMerge) -> int:
    """Fusion decoder FLOPs of one scene with merged attention (the
    :func:`distill3r.flops.decoder_flops` count, attention and its projections on ``L'``
    tokens, plus the similarity search)."""
    patches = (height // cfg.patch_size) * (width // cfg.patch_size)
    length = views * patches
    reduced = length - merge.merged_count(views, patches)
    dst = len(split_tokens(views, patches, merge.keep_views, torch.device("cpu"))[0])
    dim, hidden = cfg.dec_dim, int(cfg.dec_dim * cfg.dec_mlp_ratio)
    attention = 2 * reduced * dim * 4 * dim + 4 * reduced * reduced * dim  # qkv+proj, QK^T, AV
    mlp = 2 * length * dim * hidden * 2
    search = 2 * (length - dst) * dst * dim
    blocks = max(cfg.hooks)
    return 2 * length * cfg.enc_dim * dim + blocks * (attention + mlp + search)
