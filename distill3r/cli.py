"""The shared command-line frame of every ``stages/*.py`` script.

:func:`stage_parser` adds the options every stage has (``--params``, ``--no-progress``);
:func:`run_stage` parses, loads and fully validates the params file, prepares the CPU runtime
(:mod:`distill3r.runtime`) before torch is imported, then calls the stage's body. Bad input
(``ValueError`` and its subclasses, a missing file, or a stage's own error types) is printed as
``<stage>: error: <message>`` with exit status 1 and no traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from distill3r.config import Params, load_params
from distill3r.runtime import apply_threads, configure_environment

Body = Callable[[argparse.Namespace, Params], Optional[int]]


def stage_parser(doc: str, params_default: Optional[str] = "params.yaml",
                 prog: Optional[str] = None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with ``--params`` and
    ``--no-progress``. ``params_default=None``: without ``--params`` the stage uses
    ``params.yaml`` if it exists, else the built-in defaults. ``prog``: the program name in
    usage lines (default: the script's)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0].strip())
    parser.add_argument("--params", default=params_default,
                        help="params file (default %(default)s)" if params_default else
                        "params file (default params.yaml if present, else built-in defaults)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _params(path: Optional[str]) -> Params:
    if path is None:
        if not Path("params.yaml").is_file():
            params = Params()
            params.validate()
            return params
        path = "params.yaml"
    return load_params(path)


def run_stage(name: str, parser: argparse.ArgumentParser, body: Body,
              argv: Optional[Sequence[str]] = None,
              errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run one stage; returns its exit status (0, the body's int, or 1 for bad input)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = _params(args.params)
        configure_environment(params.runtime)
        import torch

        threads_before = torch.get_num_threads()
        try:
            apply_threads(params.runtime)
            return body(args, params) or 0
        finally:
            torch.set_num_threads(threads_before)  # for callers that run a stage in-process
    except (ValueError, FileNotFoundError, *errors) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
