"""Progress bars that suit both a terminal and a log file.

On a terminal :func:`progress_bar` is a plain ``tqdm`` bar. When stderr is not a terminal
(``dvc repro`` piping into CI or a log file) the bar is printed as a whole line at most every
``LOG_INTERVAL_S`` seconds (count, elapsed, ETA and a smoothed rate), instead of carriage-return
updates that pile up into one endless line.
"""

from __future__ import annotations

import sys
from typing import Any

LOG_INTERVAL_S = 30.0


class _LineWriter:
    """A file for tqdm that turns each redraw into one line."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, **kwargs: Any):
    """``tqdm(iterable, **kwargs)``, line-per-update when stderr is not a terminal."""
    from tqdm import tqdm

    stream = sys.stderr
    if not kwargs.get("disable") and not stream.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("file", _LineWriter(stream))
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
    return tqdm(iterable, **kwargs)
