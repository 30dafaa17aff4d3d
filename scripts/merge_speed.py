"""Fusion-decoder time and FLOPs versus views, with and without token merging (``model.merge``).

    python scripts/merge_speed.py --model tiny --size 112 112 --views 256 512 1024 \
        --ratios 0.5 0.75 [--threads 2]

Runs the streamed decoder (:func:`distill3r.models.streaming.decode_tokens`, bf16 autocast on
the CPU, the ``infer`` defaults for chunks) of a student with seeded random weights on seeded
random encoder tokens of ``N`` views, once per setting, and prints one JSON row per (views,
setting): wall seconds, the analytic decoder FLOPs (:func:`distill3r.flops.decoder_flops`, or
:func:`distill3r.models.merge.merged_decoder_flops` when merging) and the ratios to no merging.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    p.add_argument("--views", type=int, nargs="+", default=[256, 512])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--token-chunk", type=int, default=8192)
    args = p.parse_args(argv)
    import torch

    from distill3r.flops import decoder_flops
    from distill3r.models import build_student
    from distill3r.models.merge import TokenMerge, merged_decoder_flops
    from distill3r.models.streaming import decode_tokens

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_student(args.model).eval()
    cfg, (H, W) = model.config, args.size
    tokens = (H // cfg.patch_size) * (W // cfg.patch_size)
    hooks = [k for k in cfg.hooks if k > 0]
    cpu = torch.device("cpu")
    for n in args.views:
        enc = torch.randn(n, tokens, cfg.enc_dim, generator=torch.Generator().manual_seed(n))
        enc = enc.to(torch.bfloat16)
        base = None
        for ratio in [0.0] + list(args.ratios):
            merge = TokenMerge(ratio) if ratio > 0 else None
            model.decoder.merge = merge
            begin = time.perf_counter()
            with torch.inference_mode():
                decode_tokens(model.decoder, enc, hooks, cpu, torch.bfloat16, 8,
                              args.token_chunk)
            seconds = time.perf_counter() - begin
            flops = (decoder_flops(cfg, 1, n, H, W) if merge is None
                     else merged_decoder_flops(cfg, n, H, W, merge))
            base = base or (seconds, flops)
            print(json.dumps({"model": args.model, "views": n, "ratio": ratio,
                              "seconds": seconds, "decoder_gflops": flops / 1e9,
                              "speedup": base[0] / seconds, "flop_ratio": base[1] / flops}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
