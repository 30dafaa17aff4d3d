"""Files replaced atomically: write a temporary sibling, then rename it over the target.

Every output a later run trusts (manifest, reports, checkpoints, converted images, point
clouds) is written through :func:`replacing`, so an interrupted run leaves the old file or the
new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error it
    is renamed over ``path`` (after an fsync if ``fsync``); it never outlives the block.

    The temporary name is ``.<name>.tmp-<pid><suffix>``: hidden, per process, and ending in the
    target's suffix for writers that choose the format from it (OpenCV, ``np.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
