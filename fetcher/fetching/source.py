"""``BlobSource``: where the fetch service gets blobs it lacks, and what a source answers.

Three sources implement it (one contract suite, ``tests/fetcher/fetching/test_sources.py``,
runs against each): ``CasSource`` (any ``lazycaf.cas`` backend), ``PeerSource`` (another
host's daemon, ``fetcher.fetching.peersource``) and ``TieredSource`` (the blob's home peer,
then the CAS: ``fetcher.fetching.sources``).

A source answers blobs as they travelled (``Fetched``: encoding and payload) and never
verifies them: the fetch service verifies every answer in one place
(``lazycaf.core.verified.verify_blob``) before anything enters the cache, whichever source
sent it. ``Priority`` picks the connection pool a request uses, so a read never waits for a
connection behind prefetch traffic.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from lazycaf.core.digest import Digest
from lazycaf.core.errors import LazyCafError
from lazycaf.core.priority import Priority

__all__ = ["Arrived", "BlobSource", "Fetched", "Origin", "Outcome"]

Origin = Literal["cas", "peer"]


@dataclass(frozen=True)
class Fetched:
    """One blob as a source sent it: not verified yet. ``peer``: the address that sent it;
    ``bundle``: the part of a hot-set bundle it came in (a record that does not verify is
    fetched again on its own, as a peer's is)."""

    encoding: str
    payload: bytes
    origin: Origin
    peer: str | None = None
    bundle: str | None = None

    @property
    def retry_alone(self) -> bool:
        """Bytes that do not verify are this sender's fault: ask the CAS for the blob."""
        return self.peer is not None or self.bundle is not None


# Several blobs: those the source gave, and the error that kept the others back (None when
# the source simply lacks them).
Outcome = tuple[dict[Digest, Fetched], LazyCafError | None]
# Blobs handed over while a request is still answering (``CasSource.fetch_many(arrived=)``).
Arrived = Callable[[dict[Digest, Fetched]], Awaitable[None]]


class BlobSource(Protocol):
    """Blobs by digest, read-only.

    ``fetch`` raises ``BlobNotFound`` when the source lacks the blob and another
    ``LazyCafError`` (``Unavailable`` and its kinds) when it could not answer. ``fetch_many``
    leaves out what it could not give and returns the error that stopped it, if one did.
    """

    where: str  # for messages: the CAS's address, a peer's

    async def fetch(self, digest: Digest, priority: Priority) -> Fetched: ...

    async def fetch_many(self, digests: Sequence[Digest], priority: Priority) -> Outcome: ...

    async def aclose(self) -> None: ...
