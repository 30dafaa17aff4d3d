"""A strict reader of plain (uncompressed) ustar archives, as the cache writer produces them.

Python's ``tarfile`` opens compressed streams transparently, accepts pax and GNU extension
headers whose contents it reads into memory at the size they claim, and treats a zero block
anywhere as the end of the archive. The cache's shards need none of that, so this reader
accepts only what the writer writes: 512-byte ustar headers with a valid checksum, regular
files with short plain names, octal sizes, data padded to 512 bytes, then zero blocks up to
the end of the file. Each member's size is checked against the bytes left in the file and a
ceiling before it is read. Everything else is a :class:`CacheError` naming the archive and
the member (or byte offset) where reading stopped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Iterator

from distill3r.cache.errors import CacheError

BLOCK = 512
_REGULAR = (b"0", b"\0")


def _octal(field: bytes, what: str) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text or any(c not in b"01234567" for c in text):
        raise CacheError(f"{what} field {field!r} is not an octal number")
    return int(text, 8)


def _header(block: bytes, offset: int) -> tuple[str, int]:
    """``(name, size)`` of a regular-file header block (``CacheError`` otherwise)."""
    where = f"header at byte {offset}"
    stored = _octal(block[148:156], f"{where}: checksum")
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise CacheError(f"{where}: header checksum mismatch")
    if block[257:263] not in (b"ustar\0", b"ustar "):
        raise CacheError(f"{where}: not a ustar header")
    if block[156:157] not in _REGULAR:
        raise CacheError(f"{where}: entry type {block[156:157]!r} (only regular files are "
                         "read; no links, folders or pax/GNU extension headers)")
    if block[345:500].strip(b"\0"):
        raise CacheError(f"{where}: long names (ustar prefix) are not used by the cache")
    raw_name = block[:100].split(b"\0", 1)[0]
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError:
        raise CacheError(f"{where}: member name {raw_name!r} is not ASCII") from None
    if not name or "/" in name or name.startswith("."):
        raise CacheError(f"{where}: member name {name!r} is not a plain file name")
    return name, _octal(block[124:136], f"{where} ({name}): size")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(n, len(data))
    return data


def tar_members(path: str | Path, max_member_bytes: int) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every member of the plain tar at ``path``, in stored order.

    Raises :class:`CacheError` (``path`` and ``member`` set) for anything but a complete plain
    ustar archive: compressed or foreign data, a bad header, a member above
    ``max_member_bytes`` or longer than the rest of the file, a cut anywhere, or data after the
    end-of-archive blocks."""
    path = str(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CacheError(f"cannot open the shard: {exc}", path) from exc
    with f:
        file_size = os.fstat(f.fileno()).st_size
        offset, name = 0, None
        try:
            while True:
                block = _read_exact(f, BLOCK)
                if block == bytes(BLOCK):
                    break
                name = None
                name, size = _header(block, offset)
                if size > max_member_bytes:
                    raise CacheError(f"claims {size} bytes, above the limit of "
                                     f"{max_member_bytes} for this split")
                padded = -(-size // BLOCK) * BLOCK
                if offset + BLOCK + padded > file_size:
                    raise CacheError(f"claims {size} bytes but the file ends "
                                     f"{file_size - offset - BLOCK} bytes after its header "
                                     "(truncated shard)")
                data = _read_exact(f, size)
                _read_exact(f, padded - size)
                yield name, data
                offset += BLOCK + padded
            name = None
            while chunk := f.read(1 << 20):
                if chunk.strip(b"\0"):
                    raise CacheError(f"data after the end-of-archive block at byte {offset} "
                                     "(a zero block inside the shard, or appended data)")
            if offset == 0:
                raise CacheError("empty archive")
        except EOFError:
            raise CacheError(f"truncated at byte {file_size} (no end-of-archive marker)"
                             if name is None else "truncated inside this member",
                             path, member=name) from None
        except CacheError as exc:
            raise exc.located(path, member=name) from exc
