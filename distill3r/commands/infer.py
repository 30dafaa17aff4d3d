"""Reconstruct scenes from a folder of images with a trained student.

    distill3r infer IMAGES_DIR --checkpoint models/student --output-dir reports/infer \
        [--size 112] [--conf-percentile 10] [--device auto] [--colmap] \
        [--params params.yaml] [--no-progress]

(``python stages/infer.py ...``, the DVC stage, takes the same arguments.)

IMAGES_DIR is one scene folder of images (scene name = folder name; an rgb/ or images/
subfolder also works) or a folder of scene folders. Defaults come from the ``infer`` section of
``--params``; flags given on the command line override them. Writes, per scene,
``<scene>_student.ply``, ``<scene>_cameras.json``, ``<scene>_info.json``, ``<scene>_preview.png``,
and with ``--colmap`` the COLMAP sparse model ``<scene>_colmap/`` (``images/``, ``sparse/0/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from distill3r.cli import run_stage, stage_parser


def _infer(args, params) -> int:
    from distill3r.inference import run_inference

    overrides = {"size": args.size, "conf_percentile": args.conf_percentile,
                 "device": args.device, "colmap": args.colmap}
    infer = dataclasses.replace(params.infer, **{k: v for k, v in overrides.items()
                                                 if v is not None})
    infer.validate("infer")
    failures: list[tuple[str, str]] = []
    infos = run_inference(args.images_dir, args.checkpoint, args.output_dir, infer,
                          failures=failures, merge=params.model.merge)
    for info in infos:
        print(f"{info['scene']}: {info['views']} view(s) at {info['resolution'][0]}x"
              f"{info['resolution'][1]}, {info['points_kept']} points, "
              f"{info['timings_s']['total']:.2f} s -> {info['outputs']['student.ply']}")
        if info.get("colmap"):
            print(f"{info['scene']}: COLMAP model ({info['colmap']['points']} points) -> "
                  f"{info['outputs']['colmap']}")
    for scene, message in failures:  # the other scenes were still reconstructed
        print(f"infer: error: scene {scene}: {message}", file=sys.stderr)
    if failures:
        print(f"infer: {len(failures)} of {len(infos) + len(failures)} scene(s) failed: "
              f"{', '.join(s for s, _ in failures)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = stage_parser(__doc__, params_default=None, prog=prog)
    parser.add_argument("images_dir", help="a scene folder of images, or a folder of scene "
                        "folders")
    parser.add_argument("--checkpoint", required=True, help="student folder (model.safetensors "
                        "+ config.json), e.g. models/student")
    parser.add_argument("--output-dir", required=True, help="where the outputs are written")
    parser.add_argument("--size", type=int, help="long image side in pixels (rounded to the "
                        "patch)")
    parser.add_argument("--conf-percentile", type=float,
                        help="drop points below this percentile of local confidence (0-100)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--colmap", action=argparse.BooleanOptionalAction, default=None,
                        help="also write <scene>_colmap/, a COLMAP sparse model with its images "
                        "(default: params infer.colmap)")
    return run_stage("infer", parser, _infer, argv)
