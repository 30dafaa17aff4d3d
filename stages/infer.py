"""Reconstruct scenes from a folder of images with a trained student.

    python stages/infer.py IMAGES_DIR --checkpoint models/student --output-dir reports/infer \
        [--size 112] [--conf-percentile 10] [--device auto] [--params params.yaml]

IMAGES_DIR is one scene folder of images (scene name = folder name; an rgb/ or images/
subfolder also works) or a folder of scene folders. Defaults come from the ``infer`` section of
``--params``; flags given on the command line override them. Writes, per scene,
``<scene>_student.ply``, ``<scene>_cameras.json``, ``<scene>_info.json``, ``<scene>_preview.png``.
A scene that fails (e.g. a corrupt image) is reported and the other scenes still run; the exit
status is then 1, after listing the failed scenes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from distill3r.config import InferParams, load_params
from distill3r.inference import run_inference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images_dir", help="a scene folder of images, or a folder of scene folders")
    p.add_argument("--checkpoint", required=True, help="student folder (model.safetensors + "
                   "config.json), e.g. models/student")
    p.add_argument("--output-dir", required=True, help="where the outputs are written")
    p.add_argument("--size", type=int, help="long image side in pixels (rounded to the patch)")
    p.add_argument("--conf-percentile", type=float,
                   help="drop points below this percentile of local confidence (0-100)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--params", default=None,
                   help="params file for the defaults (section infer); default params.yaml "
                   "if it exists, else the built-in defaults")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.params is not None or Path("params.yaml").is_file():
            params = load_params(args.params or "params.yaml").infer
        else:
            params = InferParams()
        overrides = {"size": args.size, "conf_percentile": args.conf_percentile,
                     "device": args.device}
        params = dataclasses.replace(params, **{k: v for k, v in overrides.items()
                                                if v is not None})
        failures: list[tuple[str, str]] = []
        infos = run_inference(args.images_dir, args.checkpoint, args.output_dir, params,
                              failures=failures)
    except ValueError as exc:
        print(f"infer: error: {exc}", file=sys.stderr)
        return 1
    for info in infos:
        print(f"{info['scene']}: {info['views']} view(s) at {info['resolution'][0]}x"
              f"{info['resolution'][1]}, {info['points_kept']} points, "
              f"{info['timings_s']['total']:.2f} s -> {info['outputs']['student.ply']}")
    for scene, message in failures:
        print(f"infer: error: scene {scene}: {message}", file=sys.stderr)
    if failures:
        print(f"infer: {len(failures)} of {len(infos) + len(failures)} scene(s) failed: "
              f"{', '.join(s for s, _ in failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
