"""Stage manifest: list the sources of params ``data`` into the frame manifest CSV.

    python stages/manifest.py --params params.yaml --out data/manifest.csv \
        --images-dir data/images --report reports/manifest_report.json
"""

from __future__ import annotations

import argparse
import logging

from distill3r.config import load_params
from distill3r.data.build import build_manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section data)")
    parser.add_argument("--out", required=True, help="manifest CSV to write")
    parser.add_argument("--images-dir", required=True,
                        help="folder for resized copies of images larger than data.resize_max")
    parser.add_argument("--report", default=None, help="JSON report (splits, skipped scenes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params).data
    report = build_manifest(params, args.out, args.images_dir, report_path=args.report,
                            progress=True)
    splits = report["splits"]
    print(f"{report['frames']} frames: train {splits['train']['scenes']} scenes, "
          f"val {splits['val']['scenes']} scenes, {len(report['skipped'])} skipped -> {args.out}")


if __name__ == "__main__":
    main()
