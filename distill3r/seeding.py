"""Stable hashing of names into seeds and numbers: the same on every machine, run and Python
version (unlike the salted built-in ``hash()``).

One hash, SHA-256 of the parts' ``str()`` joined by ``\\x1f``, read two ways: :func:`stable_seed`
(a 63-bit integer for ``numpy.random.default_rng``) and :func:`stable_unit` (a number in [0, 1),
e.g. for a train/val split by scene).
"""

from __future__ import annotations

import hashlib


def _digest(parts: tuple) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def stable_seed(*parts) -> int:
    """A 63-bit seed from ``parts``."""
    return int.from_bytes(_digest(parts)[:8], "little") >> 1


def stable_unit(*parts) -> float:
    """A number in [0, 1) from ``parts``."""
    return int.from_bytes(_digest(parts)[:8], "big") / 2.0 ** 64
