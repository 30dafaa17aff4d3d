"""Staging, locking and the atomic swap of a complete cache (both splits at once).

A build of ``<out>`` (e.g. ``data/cache``) stages beside it, never inside::

    <parent>/.<out>.lock                 held by every build (exclusive: whole-cache builds and
                                         the swap; shared: parts of a multi-machine build)
    <parent>/.<out>.build-<fingerprint>/ staging of one build
        cache/<split>/shard-NNNNNN.tar   shards, then each split's index.json
        part-<i>-of-<k>.lock             held while a part builds
        SWAP.json                        written just before the swap: the staged cache is
                                         complete and may replace ``<out>``

The swap exchanges ``cache/`` and ``<out>`` in one rename (``atomic.replace_dir``): readers see
the old pair of splits or the new pair, never train from one build and val from another. An
interrupted swap is finished by the next build (:func:`recover`): with ``SWAP.json`` present,
either ``<out>`` already carries the staged fingerprint (the old cache left in staging is
deleted) or the staged cache is swapped in. Folders are deleted by renaming them to
``.<out>.trash-*`` first, so a half-deleted folder is never mistaken for staging.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

from distill3r.atomic import replace_dir
from distill3r.cache.schema import INDEX_NAME, read_json_or_none
from distill3r.data.manifest import SPLITS

SWAP_FILE = "SWAP.json"
CACHE_SUBDIR = "cache"
log = logging.getLogger(__name__)


def staging_path(out: Path, fingerprint: str) -> Path:
    return out.parent / f".{out.name}.build-{fingerprint}"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def flocked(path: Path, message: str, shared: bool = False) -> Iterator[None]:
    """Hold ``flock`` on ``path`` (exclusive, or ``shared``) without waiting; ``ValueError``
    with ``message`` if another process holds a conflicting lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ValueError(f"{path}: {message}") from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_lock(out: Path, shared: bool = False):
    """The lock of builds into ``out`` (see the module docstring)."""
    return flocked(lock_path(out), f"another cache build into {out} is running (it holds this "
                   "lock): wait for it to finish, or stop it, then run again", shared)


def _locked_by_someone(folder: Path) -> bool:
    for lock in folder.glob("*.lock"):
        with open(lock, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
            except BlockingIOError:
                return True
    return False


def built_fingerprint(out: Path) -> Optional[str]:
    """The build fingerprint both splits of ``out`` share with every listed shard present;
    None for a missing, partial, foreign or mixed cache."""
    prints = set()
    for split in SPLITS:
        index = read_json_or_none(out / split / INDEX_NAME)
        if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
            return None
        if not all(isinstance(s, dict) and (out / split / str(s.get("name"))).is_file()
                   for s in index["shards"]):
            return None
        prints.add(index.get("fingerprint"))
    return prints.pop() if len(prints) == 1 else None


def discard(folder: Path, out: Path) -> None:
    """Delete ``folder``: renamed to ``.<out>.trash-*`` first, then removed."""
    if not folder.exists():
        return
    trash = out.parent / f".{out.name}.trash-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging/cache`` (one atomic exchange where supported), then delete
    the staging folder with the old cache in it. ``staging/SWAP.json`` must exist already."""
    replace_dir(staging / CACHE_SUBDIR, out, staging / "old")
    discard(staging, out)


def recover(out: Path) -> None:
    """Finish swaps that a killed build left half done (call under the exclusive lock)."""
    for staging in sorted(out.parent.glob(f".{out.name}.build-*")):
        journal = read_json_or_none(staging / SWAP_FILE)
        if not isinstance(journal, dict):
            continue
        if built_fingerprint(out) == journal.get("fingerprint"):
            discard(staging, out)  # swapped: what is left in staging is the old cache
        elif built_fingerprint(staging / CACHE_SUBDIR) == journal.get("fingerprint"):
            log.info("finishing an interrupted cache swap: %s -> %s", staging, out)
            swap_in(staging, out)
        else:
            discard(staging, out)


def cleanup(out: Path, keep: Optional[str] = None) -> None:
    """Remove trash, and staging folders other than ``keep`` that no live process holds."""
    for folder in out.parent.glob(f".{out.name}.trash-*"):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in out.parent.glob(f".{out.name}.build-*"):
        if folder.name != keep and folder.is_dir() and not _locked_by_someone(folder):
            discard(folder, out)
