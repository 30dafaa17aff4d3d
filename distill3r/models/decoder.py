"""Fusion decoder: global self-attention over the tokens of all views.

Tokens of each view are projected (Linear enc_dim -> dec_dim), tagged with a fixed 1-D sin-cos
image-index embedding (table ``max_views x dec_dim``) added to every token of the view, then
concatenated over views (``[B, N*P, D]``) and passed through pre-norm transformer blocks with
global attention (:func:`~distill3r.models.attention.attend`; no RoPE), then a final LayerNorm
on the last block's output.

Image indices: view 0 always gets index 0. In train mode views 1..N-1 of each sample get
distinct random indices from 1..T-1 (``T = max_views``), drawn with torch's global generator on
the model's device and **sorted ascending**, so the relative order of the views is kept while
the model sees indices far beyond the training view count (a model trained on few views can run
on hundreds); more than ``T`` training views raise ``ValueError``. In eval mode the indices are
deterministic, at the middle of that distribution (:func:`eval_view_indices`): while
``N <= T``, view i gets ``round(i * T / N)``, the expected i-th smallest of ``N - 1`` sorted
draws from 1..T-1 (for 4 views of a 1000-row table: 0, 250, 500, 750); beyond the table
(``N > T``) view i >= 1 gets ``1 + floor((i - 1) * (T - 1) / (N - 1))``, neighbouring views
sharing an index. Both rules give ``0..T-1`` at ``N = T``. Indices ``0, 1, 2, ...`` would put
views 1..N-1 where training almost never puts them (three sorted draws from 1..999 start below
10 in about 3% of samples): a 4-view demo student given them under-estimated the rotation of
view 3 by about 30% and scored PnP mAA(30) 0.29 instead of 0.43. The table itself is a fixed
buffer, not stored in checkpoints.

Token merging (:mod:`distill3r.models.merge`): with ``decoder.merge`` set, an eval-mode forward
under ``torch.inference_mode()``/``no_grad()`` merges tokens in every block's attention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from distill3r.models.attention import attend
from distill3r.models.merge import TokenMerge, merged_block_


def eval_view_indices(views: int, table: int) -> torch.Tensor:
    """``[views]`` int64 image indices at inference for a table of ``table`` rows (see the
    module docstring): view 0 -> 0 and, while ``views <= table``, view ``i >= 1`` ->
    ``round(i * table / views)``, the expected ``i``-th order statistic of the ``views - 1``
    sorted draws from 1..table-1 that train mode makes (distinct, increasing, in
    1..table-1); beyond the table, view ``i >= 1`` -> ``1 + floor((i - 1) * (table - 1) /
    (views - 1))``.

    Upstream Fast3R (facebookresearch/fast3r, ``src/models/fast3r.py``,
    ``Fast3RDecoder._get_random_image_pos``) builds the same kind of table over
    ``np.arange(1000)`` and, with ``random_image_idx_embedding``, draws unsorted
    ``randperm(999)[:N-1] + 1`` for views 1..N-1 at inference as in training, so its outputs
    vary from call to call and it has no rule beyond 1000 views (the draw runs out of
    indices)."""
    if views < 1:
        raise ValueError(f"need at least one view, got {views}")
    if views <= table:
        i = torch.arange(views, dtype=torch.int64)
        return (2 * i * table + views) // (2 * views)  # round(i * table / views), halves up
    if table < 2:
        raise ValueError(f"{views} views need an image-index table of >= 2 rows, got {table}")
    rest = torch.arange(views - 1, dtype=torch.int64) * (table - 1) // (views - 1) + 1
    return torch.cat([torch.zeros(1, dtype=torch.int64), rest])


def sincos_table(length: int, dim: int) -> torch.Tensor:
    """``[length, dim]`` float32: ``[sin(i * w_k), cos(i * w_k)]`` with
    ``w_k = 10000^(-k / (dim/2))``, ``k < dim/2``."""
    assert dim % 2 == 0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = attend(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FusionDecoder(nn.Module):
    """``[B, N, P, enc_dim]`` -> one ``[B, N, P, dec_dim]`` tensor per requested block."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float,
                 max_views: int) -> None:
        super().__init__()
        self.max_views = max_views
        self.merge: Optional[TokenMerge] = None  # token merging at inference (models.merge)
        self.proj = nn.Linear(in_dim, dim)
        self.register_buffer("index_table", sincos_table(max_views, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_weights)

    def view_indices(self, batch: int, views: int, device: torch.device) -> torch.Tensor:
        """``[B, N]`` int64 image indices (see the module docstring)."""
        if not self.training or views == 1:
            idx = eval_view_indices(views, self.max_views).to(device)
            return idx.expand(batch, views)
        if views > self.max_views:
            raise ValueError(f"{views} training views exceed the image-index table "
                             f"({self.max_views}): distinct indices cannot be drawn")
        others = torch.rand(batch, self.max_views - 1, device=device).argsort(dim=1)
        others = others[:, : views - 1].sort(dim=1).values + 1
        zero = torch.zeros(batch, 1, dtype=others.dtype, device=device)
        return torch.cat([zero, others], dim=1)

    def merging(self, views: int, tokens_per_view: int) -> bool:
        """Whether a forward of ``views`` views merges tokens (``merge`` set, eval mode, some
        token to merge); merging is inference-only: ``ValueError`` with gradients on."""
        if (self.merge is None or self.training
                or self.merge.merged_count(views, tokens_per_view) == 0):
            return False
        if torch.is_grad_enabled():
            raise ValueError("token merging is inference-only: run the model under "
                             "torch.inference_mode() or torch.no_grad(), or set merge to None")
        return True

    def forward(self, tokens: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """``blocks``: 1-based block indices to return (the last block's output is normed)."""
        b, n, p, _ = tokens.shape
        x = self.proj(tokens)
        idx = self.view_indices(b, n, tokens.device)
        x = x + self.index_table[idx][:, :, None, :].to(x.dtype)
        x = x.reshape(b, n * p, -1)
        merging = self.merging(n, p)
        if merging:
            x = x.clone()  # merged blocks update x in place
        outputs = []
        for i, block in enumerate(self.blocks[: max(blocks)], start=1):
            if merging:
                for sample in x:
                    merged_block_(block, sample, n, p, self.merge, token_chunk=8192)
            else:
                x = block(x)
            if i in blocks:
                y = self.norm(x) if i == len(self.blocks) else (x.clone() if merging else x)
                outputs.append(y.view(b, n, p, -1))
        return outputs


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
