"""Stage render_demo: render the built-in demo scenes (params ``demo``) into a raw folder.

    python stages/render_demo.py --params params.yaml --out data/raw/demo [--no-progress]
"""

from __future__ import annotations

import sys
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.cli import run_stage, stage_parser


def _render(args, params) -> None:
    from distill3r.data.demo import render_demo

    names = render_demo(args.out, params.demo, progress=not args.no_progress)
    print(f"{len(names)} demo scenes in {args.out}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="output folder of the raw demo scenes")
    return run_stage("render_demo", parser, _render, argv)


if __name__ == "__main__":
    sys.exit(main())
