"""Portable Float Map (PFM) files: the float32 image format of BlendedMVS depth maps.

Layout: a text header of three whitespace-separated fields, each usually on its own line,
``Pf`` (one channel) or ``PF`` (three channels), ``W H``, and a scale whose sign gives the byte
order (negative = little-endian, positive = big-endian), followed by one whitespace byte and
``W*H*C`` float32 values, rows stored bottom-to-top. Arrays here are top-to-bottom ``[H,W]``
(``Pf``) or ``[H,W,3]`` (``PF``) float32 in native byte order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_CHANNELS = {b"Pf": 1, b"PF": 3}
_WHITESPACE = b" \t\r\n"


def _header_tokens(data: bytes, count: int) -> tuple[list[bytes], int]:
    """The first ``count`` whitespace-separated tokens and the offset just after the last."""
    tokens, pos = [], 0
    while len(tokens) < count:
        while pos < len(data) and data[pos] in _WHITESPACE:
            pos += 1
        start = pos
        while pos < len(data) and data[pos] not in _WHITESPACE and pos - start < 32:
            pos += 1
        if start == pos:
            break
        tokens.append(data[start:pos])
    return tokens, pos


def read_pfm(path: str | Path) -> np.ndarray:
    """Read a PFM file: ``[H,W]`` (``Pf``) or ``[H,W,3]`` (``PF``) float32, top row first.

    ``ValueError`` naming the file if it is missing or unreadable, its header is malformed or
    its size does not match the header.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: PFM file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:  # unreadable (permissions, I/O error, removed meanwhile)
        raise ValueError(f"{path}: unreadable PFM file: {exc}") from exc
    tokens, pos = _header_tokens(data, 4)
    if len(tokens) < 4 or tokens[0] not in _CHANNELS:
        raise ValueError(f"{path}: not a PFM file (header must start with 'Pf' or 'PF')")
    try:
        width, height, scale = int(tokens[1]), int(tokens[2]), float(tokens[3])
    except ValueError as exc:
        raise ValueError(f"{path}: malformed PFM header {b' '.join(tokens)!r}") from exc
    if width <= 0 or height <= 0 or scale == 0 or not np.isfinite(scale):
        raise ValueError(f"{path}: malformed PFM header (size {width}x{height}, "
                         f"scale {scale})")
    channels = _CHANNELS[tokens[0]]
    expected = width * height * channels * 4
    # one whitespace byte ends the header (two for a CRLF line end)
    pos += 2 if data[pos:pos + 2] == b"\r\n" and len(data) - pos - 2 == expected else 1
    if len(data) - pos != expected:
        raise ValueError(f"{path}: PFM data is {max(len(data) - pos, 0)} bytes but the header "
                         f"({width}x{height}x{channels} float32) needs {expected}")
    dtype = np.dtype("<f4" if scale < 0 else ">f4")
    values = np.frombuffer(data, dtype=dtype, count=width * height * channels, offset=pos)
    shape = (height, width) if channels == 1 else (height, width, 3)
    return np.ascontiguousarray(values.reshape(shape)[::-1]).astype(np.float32)


def write_pfm(path: str | Path, image: np.ndarray, little_endian: bool = True) -> None:
    """Write ``[H,W]`` or ``[H,W,3]`` values as a float32 PFM file (rows bottom-to-top)."""
    image = np.asarray(image)
    if image.ndim == 2:
        kind = b"Pf"
    elif image.ndim == 3 and image.shape[2] == 3:
        kind = b"PF"
    else:
        raise ValueError(f"{path}: PFM holds [H,W] or [H,W,3] arrays, got shape {image.shape}")
    height, width = image.shape[:2]
    dtype = np.dtype("<f4" if little_endian else ">f4")
    header = b"%s\n%d %d\n%s\n" % (kind, width, height, b"-1.0" if little_endian else b"1.0")
    body = np.ascontiguousarray(image[::-1], dtype=dtype).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body)
