"""Stage manifest: list the sources of params ``data`` into the frame manifest CSV.

    python stages/manifest.py --params params.yaml --out data/manifest.csv \
        --images-dir data/images --report reports/manifest_report.json [--no-progress]
"""

from __future__ import annotations

import sys
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.cli import run_stage, stage_parser


def _manifest(args, params) -> None:
    from distill3r.data.build import build_manifest

    report = build_manifest(params.data, args.out, args.images_dir, report_path=args.report,
                            progress=not args.no_progress)
    splits = report["splits"]
    print(f"{report['frames']} frames: train {splits['train']['scenes']} scenes, "
          f"val {splits['val']['scenes']} scenes, {len(report['skipped'])} skipped -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="manifest CSV to write")
    parser.add_argument("--images-dir", required=True,
                        help="folder for resized copies of images larger than data.resize_max")
    parser.add_argument("--report", default=None, help="JSON report (splits, skipped scenes)")
    return run_stage("manifest", parser, _manifest, argv)


if __name__ == "__main__":
    sys.exit(main())
