"""The encoded payloads of blobs this daemon fetched lately, in memory, for its peers.

The cache keeps blobs decoded (Btrfs compresses them); the CAS sends them as zstd frames. A
blob's home fetches it once and then serves it to every other host that starts the same job,
mostly within seconds: keeping the frames it received lets it send those instead of the
decoded bytes (about 3x fewer bytes over the peer links, and no compression work). Bounded by
bytes, least recently used out first. Pure (no I/O); the trio thread only.
"""

from __future__ import annotations

from collections import OrderedDict

from lazycaf.core.digest import Digest

__all__ = ["RecentPayloads"]


class RecentPayloads:
    """Invariant: ``size`` is the sum of the held payloads' lengths, at most ``budget``."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self._items: OrderedDict[Digest, tuple[str, bytes]] = OrderedDict()

    def put(self, digest: Digest, encoding: str, payload: bytes) -> None:
        if len(payload) > self.budget or digest in self._items:
            return
        self._items[digest] = (encoding, payload)
        self.size += len(payload)
        while self.size > self.budget:
            _, (_, old) = self._items.popitem(last=False)
            self.size -= len(old)

    def get(self, digest: Digest) -> tuple[str, bytes] | None:
        item = self._items.get(digest)
        if item is not None:
            self._items.move_to_end(digest)
        return item

    def __len__(self) -> int:
        return len(self._items)
