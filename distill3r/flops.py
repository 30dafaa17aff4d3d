"""Analytic forward FLOPs of a student (or the Fast3R-sized reference) from its config.

Counted from layer shapes, with a multiply-add as 2 FLOPs and only the layers that carry the
compute (the same convention as ``torch.utils.flop_counter.FlopCounterMode``): linear layers,
convolutions and transposed convolutions (biases not counted), and attention (``Q K^T`` and
``A V``: ``4 * L^2 * dim`` per sequence of ``L`` tokens). Normalisation, activations,
residual adds, softmax and bilinear resizing are memory-bound and not counted.

Layer by layer (see ``distill3r/models``), for ``V = B*N`` views of ``H x W`` pixels, patch
``p``, token grid ``h x w = H/p x W/p``, ``P = h*w`` patches:

- encoder, per view: patch embedding (a ``p x p`` stride-``p`` conv ``3 -> C``; with
  ``enc_stem_dim = s > 0`` two 3x3 convs ``3 -> s -> s`` at ``H/2 x W/2`` and a ``p/2 x p/2``
  stride-``p/2`` conv ``s -> C``), then
  ``enc_depth`` blocks over ``T = P + cls + registers`` tokens (qkv, attention, proj, MLP);
- decoder, per sample: input projection ``enc_dim -> dec_dim`` on ``N*P`` tokens, then
  ``max(hooks)`` blocks with global attention over the ``L = N*P`` tokens of all views;
- each of the two DPT heads, per view: 1x1 projections, resampling (transposed convs k4 s4 and
  k2 s2, a 3x3 stride-2 conv to ``ceil(h/2) x ceil(w/2)``), 3x3 convs to ``feature_dim``, four
  fusion blocks (two residual units of two 3x3 convs at the level's size, a 1x1 conv after the
  bilinear resize to the next finer level, ``8h x 8w`` after the finest), then a 3x3 conv at
  ``8h x 8w``, a 3x3 conv at ``H x W`` and a 1x1 conv to 4 channels at ``H x W``; with
  ``dpt_image_dim = d > 0`` also the image branch (3x3 convs ``3 -> d`` at ``8h x 8w`` and
  ``d -> 2d`` stride 2, 1x1 projections of both to ``feature_dim``); with
  ``dpt_image_blocks = b > 0`` the pyramid instead: a 3x3 conv ``3 -> d`` at ``8h x 8w``,
  stages ``k = 0..3`` of width ``d 2^k`` at ``8h/2^k x 8w/2^k`` (a 3x3 stride-2 conv from the
  previous stage for ``k > 0``, ``b`` residual units of two 3x3 convs, a 1x1 projection to
  ``feature_dim``); with ``dpt_image_full = f > 0`` also two 3x3 convs ``3 -> f -> f`` and a
  1x1 projection to ``last_dim`` at ``H x W``;
- with ``global_head: pose`` the global head is an MLP ``dec_dim -> dec_dim -> 10`` on each
  view's pooled tokens (the composition ``s R x + t`` is elementwise work, not counted).
"""

from __future__ import annotations

import math

from distill3r.models import StudentConfig


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def _conv(out_pixels: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * out_pixels * c_in * c_out * kernel * kernel


def transformer_block_flops(tokens: int, seq_len: int, dim: int, mlp_ratio: float) -> int:
    """One pre-norm block on ``tokens`` tokens split in sequences of ``seq_len`` (attention is
    within a sequence): qkv + ``Q K^T`` + ``A V`` + proj + two MLP linears."""
    hidden = int(dim * mlp_ratio)
    linears = _linear(tokens, dim, 3 * dim) + _linear(tokens, dim, dim)
    linears += _linear(tokens, dim, hidden) + _linear(tokens, hidden, dim)
    attention = 4 * tokens * seq_len * dim
    return linears + attention


def encoder_flops(cfg: StudentConfig, views: int, height: int, width: int) -> int:
    """Per-view ViT encoder over ``views`` images of ``height x width``."""
    patches = (height // cfg.patch_size) * (width // cfg.patch_size)
    tokens = patches + int(cfg.enc_class_token) + cfg.enc_reg_tokens
    if cfg.enc_stem_dim:  # models.encoder.ConvStemEmbed
        half, stem = (height // 2) * (width // 2), cfg.enc_stem_dim
        embed = (_conv(half, 3, stem, 3) + _conv(half, stem, stem, 3)
                 + _conv(patches, stem, cfg.enc_dim, cfg.patch_size // 2))
    else:
        embed = _conv(patches, 3, cfg.enc_dim, cfg.patch_size)
    block = transformer_block_flops(tokens, tokens, cfg.enc_dim, cfg.enc_mlp_ratio)
    return views * (embed + cfg.enc_depth * block)


def decoder_flops(cfg: StudentConfig, batch: int, views: int, height: int, width: int) -> int:
    """Fusion decoder: projection and the blocks up to the last hook, global attention."""
    length = views * (height // cfg.patch_size) * (width // cfg.patch_size)
    blocks = max(k for k in cfg.hooks)
    proj = _linear(length, cfg.enc_dim, cfg.dec_dim)
    block = transformer_block_flops(length, length, cfg.dec_dim, cfg.dec_mlp_ratio)
    return batch * (proj + blocks * block)


def dpt_head_flops(cfg: StudentConfig, views: int, height: int, width: int,
                   image: bool = True) -> int:
    """One DPT head over ``views`` views; ``image``: with the config's image branch, if any
    (the local head has it; the global head too unless ``dpt_image_heads`` is ``"local"``)."""
    h, w = height // cfg.patch_size, width // cfg.patch_size
    d0, d1, d2, d3 = cfg.dpt_layer_dims
    feat, last = cfg.dpt_feature_dim, cfg.dpt_last_dim
    in_dims = [cfg.enc_dim if k == 0 else cfg.dec_dim for k in cfg.hooks]
    h2, w2 = math.ceil(h / 2), math.ceil(w / 2)
    sizes = [(4 * h) * (4 * w), (2 * h) * (2 * w), h * w, h2 * w2]  # level pixel counts
    flops = sum(_conv(h * w, c, d, 1) for c, d in zip(in_dims, cfg.dpt_layer_dims))
    flops += 2 * h * w * d0 * d0 * 16 + 2 * h * w * d1 * d1 * 4  # transposed convs (per input px)
    flops += _conv(h2 * w2, d3, d3, 3)
    flops += sum(_conv(s, d, feat, 3) for s, d in zip(sizes, (d0, d1, d2, d3)))
    targets = [(8 * h) * (8 * w)] + sizes[:3]  # fusion block k resizes to targets[k]
    for size, target in zip(sizes, targets):
        flops += 4 * _conv(size, feat, feat, 3) + _conv(target, feat, feat, 1)
    d, blocks = (cfg.dpt_image_dim, cfg.dpt_image_blocks) if image else (0, 0)
    if d and not blocks:  # image branch: convs at 8h x 8w and 4h x 4w, two projections
        flops += _conv(64 * h * w, 3, d, 3) + _conv(16 * h * w, d, 2 * d, 3)
        flops += _conv(16 * h * w, 2 * d, feat, 1) + _conv(64 * h * w, d, feat, 1)
    elif d:  # pyramid: stages of width d << k at (8h x 8w) / 4^k pixels, one projection each
        flops += _conv(64 * h * w, 3, d, 3)
        for k in range(4):
            pixels, dim = (64 * h * w) >> (2 * k), d << k
            if k:
                flops += _conv(pixels, dim // 2, dim, 3)
            flops += 2 * blocks * _conv(pixels, dim, dim, 3) + _conv(pixels, dim, feat, 1)
    full = cfg.dpt_image_full if d else 0
    if full:
        flops += _conv(height * width, 3, full, 3) + _conv(height * width, full, full, 3)
        flops += _conv(height * width, full, last, 1)
    flops += _conv(64 * h * w, feat, last, 3)
    flops += _conv(height * width, last, last, 3) + _conv(height * width, last, 4, 1)
    return views * flops


def forward_flops(cfg: StudentConfig, views: int, height: int, width: int,
                  batch: int = 1) -> dict[str, int]:
    """FLOPs of one forward of ``[batch, views, 3, height, width]``: ``encoder``, ``decoder``,
    ``heads`` (both) and ``total``. ``ValueError`` if the size is not a multiple of the patch."""
    if views < 1 or batch < 1:
        raise ValueError(f"views and batch must be >= 1, got views={views}, batch={batch}")
    if height <= 0 or width <= 0 or height % cfg.patch_size or width % cfg.patch_size:
        raise ValueError(f"image size {height}x{width} is not a positive multiple of the "
                         f"patch size {cfg.patch_size} of model {cfg.name!r}")
    local = dpt_head_flops(cfg, batch * views, height, width)
    both = cfg.dpt_image_heads == "both"
    pose = batch * views * (_linear(1, cfg.dec_dim, cfg.dec_dim) + _linear(1, cfg.dec_dim, 10))
    parts = {
        "encoder": encoder_flops(cfg, batch * views, height, width),
        "decoder": decoder_flops(cfg, batch, views, height, width),
        "heads": local + (dpt_head_flops(cfg, batch * views, height, width, image=both)
                          if cfg.global_head == "dpt" else pose),
    }
    parts["total"] = sum(parts.values())
    return parts
