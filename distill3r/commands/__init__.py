"""The ``distill3r`` console command: ``distill3r <command> [args...]``.

Each command is a module with ``main(argv, prog) -> int``, registered by name in
:data:`COMMANDS` and imported only when it runs (so ``distill3r --help`` loads no torch). The
stage scripts (``stages/*.py``) call the same ``main``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from distill3r import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "infer": ("distill3r.commands.infer",
              "reconstruct scenes from folders of images with a trained student"),
    "view": ("distill3r.viewer.cli",
             "show infer outputs in the browser, or export them as one HTML file"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill3r", description="Distill3R: multi-view 3D reconstruction with a "
        "distilled student.", epilog="Run `distill3r <command> --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"distill3r {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command",
                        help="; ".join(f"{name}: {text}" for name, (_, text)
                                       in sorted(COMMANDS.items())))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to the command's ``main``; its status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:  # the command parses everything after its name
        name, rest = argv[0], argv[1:]
    else:
        ns = _parser().parse_args(argv)  # --help, --version, or an unknown command (exit 2)
        name, rest = ns.command, ns.args
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest, prog=f"distill3r {name}") or 0)
