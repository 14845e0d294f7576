"""The sources a daemon's cache misses come from: the CAS, and the blob's home peer first.

``CasSource`` is any ``lazycaf.cas`` backend seen as a ``BlobSource``, with one backend (so
one connection pool) per priority, behind one circuit breaker (``fetcher.fetching.breaker``):
once the CAS has failed a few times in a row, fetches fail at once until a probe gets through.
``TieredSource`` is read-only and never writes upstream.
Without peers it is the CAS. With peers, a miss goes to the blob's home
(``PeerSet.ranking``); a home that fails or times out is backed off and skipped for that
blob, and the next-ranked live member is asked (at most ``peer_tries`` peers); the CAS is
always the last resort. When this daemon is itself the blob's home, the CAS is asked
directly. The fetch service asks ``cas`` directly for requests peers make, so a request
crosses at most one peer hop and never loops.

Answers are tagged with their origin (``Fetched.origin``, and the peer's address) so that
statistics split bytes by source and the service can back off a peer whose bytes do not
verify (``peer_failed``): sources never verify, the service does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import trio

from fetcher.fetching.breaker import CircuitBreaker
from fetcher.fetching.peersource import HomeCouldNotFetch, PeerIsSelf, PeerSources
from fetcher.fetching.source import Arrived, BlobSource, Fetched, Outcome
from fetcher.peers.peerset import PeerSet
from lazycaf.cas.api import CAS
from lazycaf.cas.batch import Record
from lazycaf.cas.bundlepart import unpack_part
from lazycaf.cas.http import HttpCAS
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, IntegrityError, LazyCafError, UsageError
from lazycaf.core.priority import Priority

__all__ = ["CasSource", "TieredSource"]

log = logging.getLogger(__name__)
_BUNDLE_RUN = 16  # records of a bundle read whole, handed over at a time


class CasSource:
    """A CAS as a ``BlobSource``: ``prefetch_cas`` (its own connection pool) serves
    prefetch, so reads never queue behind it. ``store`` is the CAS itself (refs, profiles).
    Fetches of both priorities go through one ``breaker``: the CAS is down for both."""

    def __init__(
        self, cas: CAS, prefetch_cas: CAS | None = None, *, breaker: CircuitBreaker | None = None
    ) -> None:
        self.store = cas
        self.where = cas.where
        self.breaker = breaker or CircuitBreaker(cas.where)
        self._cas = {Priority.DEMAND: cas, Priority.PREFETCH: prefetch_cas or cas}

    async def fetch(self, digest: Digest, priority: Priority) -> Fetched:
        cas = self._cas[priority]
        encoding, payload = await self.breaker.call(lambda: cas.get_encoded(digest))
        return Fetched(encoding, payload, "cas")

    async def fetch_many(
        self, digests: Sequence[Digest], priority: Priority, *, arrived: Arrived | None = None
    ) -> Outcome:
        """``arrived``: blobs are handed to it as they come in (an HTTP CAS streams its
        answer; other stores hand everything over at once) and left out of the result."""
        cas = self._cas[priority]
        if arrived is not None:
            deliver = arrived

            async def stream() -> None:
                async def wrap(records: list[Record]) -> None:
                    await deliver({d: Fetched(enc, payload, "cas") for d, enc, payload in records})

                if isinstance(cas, HttpCAS):
                    await cas.stream_many_encoded(digests, wrap)
                else:
                    got = await cas.get_many_encoded(digests)
                    await wrap([(d, enc, payload) for d, (enc, payload) in got.items()])

            try:
                await self.breaker.call(stream)
            except LazyCafError as exc:
                return {}, exc
            return {}, None
        try:
            got = await self.breaker.call(lambda: cas.get_many_encoded(digests))
        except LazyCafError as exc:
            return {}, exc
        return {
            d: Fetched(encoding, payload, "cas") for d, (encoding, payload) in got.items()
        }, None

    async def stream_bundle(
        self,
        bundle: Digest,
        priority: Priority,
        arrived: Arrived,
        near_end: Callable[[], None] | None = None,
    ) -> None:
        """The records of bundle part ``bundle`` (``lazycaf.cas.bundle``), handed to
        ``arrived`` as they come in (an HTTP CAS streams it; other stores read it whole
        first), each tagged with the part it came in. ``near_end`` is called once the rest
        of the part is about a round trip away (``HttpCAS.stream_bundle``), or read."""
        cas = self._cas[priority]
        part = bundle.hex

        async def wrap(records: list[Record]) -> None:
            await arrived({d: Fetched(enc, pl, "cas", bundle=part) for d, enc, pl in records})

        async def stream() -> None:
            if isinstance(cas, HttpCAS):
                await cas.stream_bundle(bundle, wrap, near_end)
                return
            # as stored, not verified whole: each record is verified where it is stored
            encoding, payload = await cas.get_encoded(bundle)
            if near_end is not None:
                near_end()
            try:
                records = await trio.to_thread.run_sync(_records, encoding, payload)
            except UsageError as exc:
                raise IntegrityError(f"bundle {bundle} from {self.where}: {exc}") from None
            del payload
            for start in range(0, len(records), _BUNDLE_RUN):
                await wrap(records[start : start + _BUNDLE_RUN])

        await self.breaker.call(stream)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for cas in dict.fromkeys(self._cas.values()):
                await cas.aclose()


def _records(encoding: str, payload: bytes) -> list[Record]:
    return unpack_part(framing.decode(encoding, payload, what="bundle part"))


class TieredSource:
    """Peers before the CAS. ``peer_sources(address)`` is the ``BlobSource`` of one peer."""

    def __init__(
        self,
        cas: CasSource,
        *,
        peers: PeerSet | None = None,
        peer_sources: PeerSources | None = None,
        peer_tries: int = 2,
    ) -> None:
        if (peers is None) != (peer_sources is None):
            raise ValueError("peers and peer_sources go together")
        self.cas = cas
        self.where = cas.where
        self.peers = peers
        self.peer_tries = peer_tries
        self._peer_sources = peer_sources

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            if self._peer_sources is not None:
                await self._peer_sources.aclose()
            await self.cas.aclose()

    def first_peer(self, digest: Digest) -> str | None:
        """The peer a fetch of ``digest`` asks first (None: the CAS directly)."""
        return next(self._candidates(digest), None)

    def peer_failed(self, address: str, reason: str) -> None:
        """A peer's answer did not verify (the service found out): back it off, once for
        a batch of bad blobs (the rest of the batch finds it backed off already)."""
        if self.peers is not None and self.peers.is_live(address):
            self.peers.failed(address, reason)

    def _candidates(self, digest: Digest) -> Iterator[str]:
        """Peers to ask for ``digest``, home first; none when this daemon is its home."""
        if self.peers is None:
            return
        for address in self.peers.ranking(digest)[: self.peer_tries]:
            if address == self.peers.self_address:
                return
            yield address

    def _peer(self, address: str) -> BlobSource:
        assert self._peer_sources is not None
        return self._peer_sources(address)

    async def fetch(self, digest: Digest, priority: Priority) -> Fetched:
        if self.peers is not None:
            for address in self._candidates(digest):
                try:
                    fetched = await self._peer(address).fetch(digest, priority)
                except (BlobNotFound, HomeCouldNotFetch):
                    break  # the home could not get it from the CAS either: ask it ourselves
                except PeerIsSelf:
                    self.peers.is_self(address)
                    break  # this daemon is the blob's home after all
                except LazyCafError as exc:  # failed or timed out
                    self.peers.failed(address, str(exc))
                    continue
                self.peers.succeeded(address)
                return fetched
        return await self.cas.fetch(digest, priority)

    async def fetch_many(self, digests: Sequence[Digest], priority: Priority) -> Outcome:
        """Several blobs, each from its home peer (one request per peer) or the CAS (one
        request for the rest). Blobs no source gave are absent from the result; the error
        is the CAS's when its request failed (what peers sent is kept either way)."""
        out: dict[Digest, Fetched] = {}
        remaining = list(dict.fromkeys(digests))
        to_cas: list[Digest] = []
        if self.peers is not None:
            for _ in range(self.peer_tries):
                if not remaining:
                    break
                groups: dict[str, list[Digest]] = {}
                for d in remaining:
                    home = next(self._candidates(d), None)
                    if home is None:
                        to_cas.append(d)
                    else:
                        groups.setdefault(home, []).append(d)
                remaining = []  # the blobs of peers that failed: their next-ranked member
                async with trio.open_nursery() as nursery:
                    for address, part in groups.items():
                        nursery.start_soon(
                            self._from_peer, address, part, priority, out, remaining, to_cas
                        )
        to_cas.extend(remaining)
        if not to_cas:
            return out, None
        got, error = await self.cas.fetch_many(to_cas, priority)
        out.update(got)
        return out, error

    async def _from_peer(
        self,
        address: str,
        digests: list[Digest],
        priority: Priority,
        out: dict[Digest, Fetched],
        retry: list[Digest],
        to_cas: list[Digest],
    ) -> None:
        """Ask one peer for its share; blobs it failed on go to ``retry`` (it is backed off,
        so the next round asks their next-ranked member), blobs it answered it could not get
        go to ``to_cas``."""
        assert self.peers is not None
        got, error = await self._peer(address).fetch_many(digests, priority)
        out.update(got)
        left = [d for d in digests if d not in got]
        if isinstance(error, HomeCouldNotFetch):
            to_cas.extend(left)
        elif isinstance(error, PeerIsSelf):
            self.peers.is_self(address)
            retry.extend(left)  # re-ranked without the alias: this daemon or another
        elif error is not None:  # failed, timed out, or a malformed answer
            self.peers.failed(address, str(error))
            retry.extend(left)
        else:
            self.peers.succeeded(address)
            to_cas.extend(left)
