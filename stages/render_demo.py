"""Stage render_demo: render the built-in demo scenes (params ``demo``) into a raw folder.

    python stages/render_demo.py --params params.yaml --out data/raw/demo
"""

from __future__ import annotations

import argparse
import logging

from distill3r.config import load_params
from distill3r.data.demo import render_demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section demo)")
    parser.add_argument("--out", required=True, help="output folder of the raw demo scenes")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params).demo
    names = render_demo(args.out, params, progress=not args.no_progress)
    print(f"{len(names)} demo scenes in {args.out}")


if __name__ == "__main__":
    main()
