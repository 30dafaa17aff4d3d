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


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the C
    library, the kernel or the file system does not offer it."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(src: str | Path, dst: str | Path, old: str | Path) -> Path | None:
    """Move the folder ``src`` to ``dst``, replacing any folder there; returns where the
    replaced folder now is (None if ``dst`` did not exist).

    ``dst`` absent: one rename. ``dst`` present: the two are exchanged in one atomic step
    where the system supports it (Linux: ext4, xfs, btrfs, tmpfs...), leaving the replaced
    folder at ``src``; elsewhere ``dst`` is renamed to ``old`` and then ``src`` to ``dst`` (a
    crash between the two leaves ``dst`` missing, with both folders intact). The caller
    deletes the returned folder."""
    src, dst, old = Path(src), Path(dst), Path(old)
    if not dst.exists():
        os.rename(src, dst)
        return None
    if _exchange(src, dst):
        return src
    os.rename(dst, old)
    os.rename(src, dst)
    return old
