"""What GC evicts, and when (pure: no I/O, no trio).

The cache has a byte budget counted over its own blobs (the sizes in the index, not the
filesystem's usage). GC starts when usage passes the high watermark and evicts down to the
low one. Eviction order: blobs in no live hot set before hot ones, least recently used
first within each class; pinned blobs are never evicted. ``plan_eviction`` is the whole
policy; ``fetcher.cache.collector`` runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass
from typing import Final

from lazycaf.core.digest import Digest
from lazycaf.core.errors import UsageError
from lazycaf.host.index import BlobRecord

__all__ = ["DEFAULT_BUDGET", "GcPolicy", "plan_eviction"]

DEFAULT_BUDGET: Final = 10 << 30  # or half the cache's filesystem, if that is smaller


@dataclass(frozen=True)
class GcPolicy:
    """Invariant: 0 < low <= high <= 1 (fractions of ``budget``)."""

    budget: int
    high: float = 0.9
    low: float = 0.8

    def __post_init__(self) -> None:
        if self.budget <= 0 or not 0 < self.low <= self.high <= 1:
            raise UsageError(
                f"invalid GC policy: budget {self.budget}, watermarks {self.low}..{self.high} "
                "(need 0 < low <= high <= 1)"
            )

    @property
    def high_bytes(self) -> int:
        return int(self.budget * self.high)

    @property
    def low_bytes(self) -> int:
        return int(self.budget * self.low)

    def needs_collection(self, usage: int) -> bool:
        return usage > self.high_bytes


def plan_eviction(
    records: Iterable[tuple[Digest, BlobRecord]],
    budget: int,
    low_watermark: float,
    hot: Set[Digest],
    pinned: Set[Digest],
    *,
    room: int = 0,
) -> list[Digest]:
    """The blobs to evict, in order, so that usage plus ``room`` (bytes about to arrive)
    falls to ``budget * low_watermark``; fewer when only pinned blobs would be left."""
    records = list(records)
    target = int(budget * low_watermark) - room
    usage = sum(rec.size for _, rec in records)
    if usage <= target:
        return []
    candidates = sorted(
        ((d in hot, rec.last_access_ns, d, rec.size) for d, rec in records if d not in pinned)
    )
    plan = []
    for _, _, digest, size in candidates:
        if usage <= target:
            break
        plan.append(digest)
        usage -= size
    return plan
