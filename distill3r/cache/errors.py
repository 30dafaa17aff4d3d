"""The one error type of the cache reader: a ``ValueError`` that names where reading failed."""

from __future__ import annotations


class CacheError(ValueError):
    """Bad cache input: an index, a shard, a sample or one of its members.

    The message reads ``<file>: sample <key>: member <name>: <problem>`` (the parts that are
    known), whatever failed underneath (tar, zip, zlib, npy header, JSON, sizes, checksum).
    Attributes ``path``, ``sample``, ``member`` and ``problem`` hold the parts.
    """

    def __init__(self, problem: str, path: str | None = None, sample: str | None = None,
                 member: str | None = None) -> None:
        self.problem, self.path, self.sample, self.member = problem, path, sample, member
        parts = [p for p in (path, sample and f"sample {sample}", member and f"member {member}")
                 if p]
        super().__init__(": ".join([*parts, problem]))

    def located(self, path: str | None = None, sample: str | None = None,
                member: str | None = None) -> "CacheError":
        """A copy with the missing location parts filled in."""
        return CacheError(self.problem, self.path or path, self.sample or sample,
                          self.member or member)
