"""``ensure(digest)``: make a blob present in the host cache, fetching it at most once.

Cache first, then the source (``fetcher.fetching.sources``: the blob's home peer, then the CAS).
Concurrent requests for one digest, from any number of mounts and peers, share one download
(single flight); the download runs in the service's own nursery, so a requester that gives up
does not cancel it for the others.

Verification happens here and only here: every answer of every source goes through
``verify_blob`` in the worker thread that then stages it, and ``BlobCache`` takes nothing but
``Verified`` blobs. A peer whose bytes do not verify is backed off and the blob is fetched from
the CAS instead.

Who asks and where a fetch goes are two things. A request a peer makes (``for_peer``: it
ranked this daemon the blob's home) gets download slots of its own and is fetched from the
CAS, never forwarded; it joins a download in flight only if that one goes to the CAS too, so
two daemons whose peer lists disagree never wait on each other in a cycle. A flight's route
(home peer first, or the CAS) is decided once, when the flight is made.

Priorities: on-demand reads and prefetch use separate download slots (and fetches for peers
slots of their own) and separate CAS and peer clients (so separate HTTP connection pools): a
read never waits behind prefetch traffic for a slot or a connection, and a read of a blob
that prefetch has queued but not started fetches it at once (the queue skips it later).

Budget: a verified blob is staged in ``tmp/`` and published only if the cache stays within
its budget; otherwise the download waits for a GC pass that makes room (GC normally runs
ahead of that, from the high watermark). A full disk fails the fetch with ``CacheFull``
(EIO at the reader) and wakes GC. Cache hits are remembered (``take_touched``) and written
as access times in batches, never one LMDB write per read.

Metrics (``fetcher.fetching.metrics``): the service counts and times what it does with plain
integer increments and histogram observations on the trio thread; what is in flight (reads
waiting, and for how long) is read from ``_waiting`` at scrape time, never kept as a gauge.
Prefetch hits and waste are an approximation: a blob prefetched for this host counts as a hit
the first time a demand request or a mount's touch report names it; until then its bytes are
"wasted" (``prefetch_wasted_bytes``; the newest ``_UNREAD_CAP`` such blobs are remembered).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import trio

from fetcher.cache.blobcache import BlobCache, Staged
from fetcher.cache.collector import GarbageCollector
from fetcher.fetching.breaker import CasCircuitOpen
from fetcher.fetching.metrics import FetchMetrics, failure_cause
from fetcher.fetching.recent import RecentPayloads
from fetcher.fetching.source import BlobSource, Fetched
from fetcher.fetching.sources import TieredSource
from lazycaf.cas.api import CAS
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, CacheFull, IntegrityError, LazyCafError, Unavailable
from lazycaf.core.priority import Priority
from lazycaf.core.verified import verify_blob

__all__ = ["FetchService", "FetchStatistics"]

log = logging.getLogger(__name__)
DEMAND: Final = Priority.DEMAND
PREFETCH: Final = Priority.PREFETCH
BLOCKED_AFTER: Final = 1.0  # a read waiting longer than this counts as blocked (a gauge)
_UNREAD_CAP: Final = 1 << 20  # prefetched blobs remembered until read (~150 MB at most)
_STORE_SLICE: Final = 16  # blobs of a group stored with one thread hop ...
_STORE_SLICE_BYTES: Final = 8 << 20  # ... or this many bytes as sent, whichever comes first
_AFTER_BUNDLE: Final = 64  # blobs a bundle did not bring: fetched in groups this large
_PART_DEADLINE: Final = 300.0  # longest one part of a bundle may take (then blob by blob)
_PART_STALL: Final = 1.0  # a read waits for a bundle part on its way while it brings records


@dataclass(frozen=True)
class FetchStatistics:
    hits: int
    misses: int
    fetches: int
    fetch_failures: int
    bytes_fetched: int
    bytes_served: int
    wait_seconds: float
    blobs_cached: int
    prefetched: int
    bytes_prefetched: int
    prefetch_queued: int
    bytes_from_cache: int  # demand reads the cache already held
    bytes_from_peers: int
    bytes_from_cas: int
    blobs_from_peers: int
    blobs_from_cas: int
    blobs_to_peers: int  # served to other daemons (peer API)
    bytes_to_peers: int
    read_waits: int  # demand reads that waited on a fetch (``wait_seconds`` is their sum)
    reads_in_flight: int  # demand reads waiting on a fetch now
    reads_blocked: int  # of those, the ones waiting longer than ``BLOCKED_AFTER``
    failures_not_found: int  # ``fetch_failures`` by cause
    failures_unavailable: int
    failures_integrity: int
    failures_cache_full: int
    failures_circuit_open: int
    prefetch_hits: int  # prefetched blobs a read asked for later
    prefetch_wasted_bytes: int  # prefetched bytes no read has asked for (yet)
    bundle_parts_fetched: int  # parts of hot-set bundles streamed to their end
    blobs_from_bundles: int  # blobs stored from them
    bundle_bytes_unused: int  # bytes of their records not stored: here or fetched already


class _PartStream:
    """A bundle part whose request is on its way: its flights' reads wait for it."""

    __slots__ = ("changed", "ended")

    def __init__(self) -> None:
        self.ended = False
        self.changed = trio.Event()  # set (and replaced) when records arrive or it ends

    def tick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class _Flight:
    __slots__ = (
        "done",
        "error",
        "for_peer",
        "part",
        "priority",
        "size",
        "started",
        "stored",
        "taken",
        "via_peer",
    )

    def __init__(self, priority: Priority, for_peer: bool, via_peer: bool = False) -> None:
        self.done = trio.Event()
        self.error: LazyCafError | None = None
        self.size = 0
        self.started = False  # its download holds a slot and asked a source
        self.taken = False  # a demand read took it over from a prefetch group not started
        self.stored = False
        self.priority = priority
        self.for_peer = for_peer  # a peer asked: own slots, never forwarded
        self.via_peer = via_peer  # the route: the blob's home peer first (else the CAS)
        self.part: _PartStream | None = None  # the bundle part on its way with its bytes


class FetchService:
    """Single-flight fetching into a ``BlobCache``. Use inside ``run()``.

    Invariant: at most one download per (digest, for_peer) is in flight; ``_flights`` holds
    it until its waiters are woken.
    """

    def __init__(
        self,
        cache: BlobCache,
        source: TieredSource,
        *,
        concurrency: int = 16,
        prefetch_concurrency: int = 8,
        gc: GarbageCollector | None = None,
        recent_budget: int = 0,
        metrics: FetchMetrics | None = None,
    ) -> None:
        self.cache = cache
        self.metrics = metrics or FetchMetrics()
        self.gc = gc
        # zstd payloads fetched from the CAS, for serving peers (0: no peers, keep none)
        self.recent = RecentPayloads(recent_budget)
        self._touched: set[Digest] = set()
        self.source = source
        # Download slots per (priority, for_peer). Fetches for peers have their own:
        # a routed fetch holds its slot while it waits on a peer, and if that peer's fetches
        # for us took from the same pool, two daemons could each hold every slot waiting on
        # the other.
        self._slots = {
            (prio, for_peer): trio.CapacityLimiter(n)
            for prio, n in ((DEMAND, concurrency), (PREFETCH, prefetch_concurrency))
            for for_peer in (False, True)
        }
        # Threads that write blobs, per priority: a demand read's blob never queues behind
        # a prefetch group's stores (trio's limiters are first come, first served)
        self._disk_for = {DEMAND: trio.CapacityLimiter(4), PREFETCH: trio.CapacityLimiter(2)}
        self._flights: dict[tuple[Digest, bool], _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._hits = self._misses = self._fetches = self._failures = 0
        self._bytes_fetched = self._bytes_served = 0
        self._prefetched = self._bytes_prefetched = 0
        self._wait = 0.0
        self._by_origin = {"cas": [0, 0], "peer": [0, 0]}  # origin -> [blobs, bytes]
        self._hit_bytes = 0
        self._to_peers = [0, 0]
        self._read_waits = 0
        self._waiting: dict[int, float] = {}  # demand reads waiting now: ticket -> start
        self._ticket = 0
        self._failed_by = dict.fromkeys(
            ("not_found", "unavailable", "integrity", "cache_full", "circuit_open"), 0
        )
        self._unread: dict[Digest, int] = {}  # prefetched for this host, not read yet
        self._unread_bytes = 0
        self._prefetch_hits = 0
        self._bundled = [0, 0, 0]  # blobs stored from bundles, parts streamed, bytes unused
        self.queued = 0  # set by the prefetch queue

    @property
    def cas(self) -> CAS:
        return self.source.cas.store

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def statistics(self) -> FetchStatistics:
        return FetchStatistics(
            self._hits,
            self._misses,
            self._fetches,
            self._failures,
            self._bytes_fetched,
            self._bytes_served,
            round(self._wait, 6),
            len(self.cache.index),
            self._prefetched,
            self._bytes_prefetched,
            self.queued,
            self._hit_bytes,
            self._by_origin["peer"][1],
            self._by_origin["cas"][1],
            self._by_origin["peer"][0],
            self._by_origin["cas"][0],
            self._to_peers[0],
            self._to_peers[1],
            self._read_waits,
            *self._reads_waiting(),
            **{f"failures_{cause}": n for cause, n in self._failed_by.items()},
            prefetch_hits=self._prefetch_hits,
            prefetch_wasted_bytes=self._unread_bytes,
            bundle_parts_fetched=self._bundled[1],
            blobs_from_bundles=self._bundled[0],
            bundle_bytes_unused=self._bundled[2],
        )

    def _reads_waiting(self) -> tuple[int, int]:
        """Demand reads waiting on a fetch now, and how many of them longer than
        ``BLOCKED_AFTER`` (read at scrape time: nothing is updated while they wait)."""
        since = time.monotonic() - BLOCKED_AFTER
        return len(self._waiting), sum(1 for t in self._waiting.values() if t < since)

    def _read_by_demand(self, digest: Digest) -> None:
        """A read asked for ``digest``: a prefetch hit if prefetch brought it here unread."""
        size = self._unread.pop(digest, None)
        if size is not None:
            self._prefetch_hits += 1
            self._unread_bytes -= size

    def note_served_to_peer(self, blobs: int, size: int) -> None:
        self._to_peers[0] += blobs
        self._to_peers[1] += size

    def busy(self) -> bool:
        """Whether any fetch is in flight (the compactor waits for quiet)."""
        return bool(self._flights)

    def is_cached(self, digest: Digest) -> bool:
        return self._cached_size(digest) is not None

    def indexed(self, digest: Digest) -> bool:
        """The cache's index lists the blob: what prefetch goes by. A memory-mapped lookup
        and no ``stat``: a hot set's 1,220 blob files take 36 ms to ``stat`` from a cold page
        cache, on the loop, before a mount may answer its first read. The file may be gone
        (evicted between its unlink and its index entry's removal, or removed by hand): a
        read then fetches it on demand (``ensure`` stats), and a prefetch's warm pass, which
        opens every file anyway, queues it (``PrefetchQueue``)."""
        return digest in self.cache.index

    def in_flight(self, digest: Digest) -> bool:
        return (digest, False) in self._flights or (digest, True) in self._flights

    def _joinable(self, digest: Digest, for_peer: bool) -> _Flight | None:
        flight = self._flights.get((digest, True)) or self._flights.get((digest, False))
        if flight is not None and for_peer and flight.via_peer:
            return None  # it may be waiting on the very peer that asks: never join it
        return flight

    def _new_flight(
        self, digest: Digest, priority: Priority, for_peer: bool, via_peer: bool | None = None
    ) -> _Flight:
        """Register a flight; its route (a peer first, or the CAS) is decided here, once."""
        if via_peer is None:
            via_peer = not for_peer and self.source.first_peer(digest) is not None
        flight = self._flights[(digest, for_peer)] = _Flight(priority, for_peer, via_peer)
        return flight

    def _route(self, flight: _Flight) -> BlobSource:
        """Where a flight's download goes: the tiered source (its home peer first), or the
        CAS directly (a peer asked, or this daemon is the blob's home)."""
        return self.source if flight.via_peer else self.source.cas

    async def ensure(
        self, digest: Digest, *, priority: Priority = DEMAND, for_peer: bool = False
    ) -> int:
        """Return the blob's size once it is in the cache; raise the fetch's error.
        ``for_peer``: a peer asks (fetch from the CAS, never from another peer)."""
        # An LMDB get is a memory-mapped lookup and the stat hits the dentry cache: cheaper
        # inline than the ~100 us of a thread hop, on the path every request takes.
        record = self._cached_size(digest)
        # Reads of this host's mounts count as hits and misses; peers' requests are counted
        # by the peer API (``note_served_to_peer``), but keep their blobs recently used too.
        local = priority == DEMAND and not for_peer
        if record is not None:
            if priority == DEMAND:
                self._touched.add(digest)
            if local:
                self._hits += 1
                self._bytes_served += record
                self._hit_bytes += record
                if self._unread:
                    self._read_by_demand(digest)
            return record
        start = time.monotonic()
        if local:
            self._misses += 1
            return await self._wait_as_reader(digest, start)
        return await self._join_or_start(digest, priority, for_peer)

    async def _wait_as_reader(self, digest: Digest, start: float) -> int:
        """A read of this host's mounts that missed: wait on the flight, timed (the read
        wait histogram) and visible as in flight while it waits."""
        ticket = self._ticket = self._ticket + 1
        self._waiting[ticket] = start
        try:
            size = await self._join_or_start(digest, DEMAND, False)
        finally:
            del self._waiting[ticket]
            waited = time.monotonic() - start
            self._wait += waited
            self._read_waits += 1
            self.metrics.read_wait.observe(waited)
        self._bytes_served += size
        self._read_by_demand(digest)
        return size

    async def _join_or_start(self, digest: Digest, priority: Priority, for_peer: bool) -> int:
        flight = self._joinable(digest, for_peer)
        assert self._nursery is not None, "FetchService.run() is not running"
        if flight is None:
            flight = self._new_flight(digest, priority, for_peer)
            self._nursery.start_soon(self._download, digest, flight)
        elif priority == DEMAND and flight.priority == PREFETCH and not flight.started:
            if flight.part is not None:
                await _wait_for_part(flight, flight.part)
            if flight.priority == PREFETCH and not flight.started:
                # queued in a prefetch group still waiting for a slot (or in a bundle part
                # not on its way, or stalled): a read must not wait for the batches ahead
                # of it, so it fetches the blob now (the group skips it)
                flight.taken, flight.priority = True, DEMAND
                self._nursery.start_soon(self._download, digest, flight)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.size

    def touch(self, digests: list[Digest]) -> None:
        """Note reads the daemon did not serve itself (mounts read cached blobs directly)."""
        self._touched.update(digests)
        if self._unread:
            for d in digests:
                self._read_by_demand(d)

    def take_touched(self) -> set[Digest]:
        """The blobs read since the last call (for one batched access-time write)."""
        touched, self._touched = self._touched, set()
        return touched

    def _cached_size(self, digest: Digest) -> int | None:
        rec = self.cache.index.get(digest)
        if rec is None or not self.cache.path(digest).exists():
            return None
        return rec.size

    async def fetch_many(
        self,
        digests: list[Digest],
        *,
        priority: Priority = PREFETCH,
        for_peer: bool = False,
        join: bool = False,
    ) -> list[Digest]:
        """Fetch several blobs with one request per source (``BlobSource.fetch_many``):
        per-request costs, not bytes, bound prefetch of many small blobs. Blobs already
        cached are skipped, and so are blobs in flight, unless ``join``: then return only
        once those landed too. Returns the blobs waited for that failed to land (every
        other one of ``digests`` is in the cache, unless GC took it since). Failures are
        logged once per group and kind of error, not per blob (a later read fetches on
        demand; a peer that asked misses that blob in the answer)."""
        todo: dict[Digest, None] = {}
        others: list[tuple[Digest, _Flight]] = []
        for d in digests:
            if self.is_cached(d) or d in todo:
                continue
            flight = self._joinable(d, for_peer)
            if flight is None:
                todo[d] = None
            elif join:
                others.append((d, flight))
        # Blobs this daemon fetches from the CAS form a request of their own, and land
        # without waiting for the peers': a peer may be waiting for exactly those.
        via_cas = [d for d in todo if for_peer or self.source.first_peer(d) is None]
        cas_set = set(via_cas)
        via_peers = [d for d in todo if d not in cas_set]  # ranked once, here
        # The downloads run in the service's nursery, like ``ensure``'s: a requester that
        # gives up (a peer that timed out) does not cancel them for the others.
        assert self._nursery is not None, "FetchService.run() is not running"
        mine: list[tuple[Digest, _Flight]] = []
        for group, to_cas in ((via_cas, True), (via_peers, False)):
            if group:  # flights exist before the first checkpoint: no second download
                flights = {d: self._new_flight(d, priority, for_peer, not to_cas) for d in group}
                self._nursery.start_soon(self._fetch_group, flights, priority, for_peer, to_cas)
                mine.extend(flights.items())
        for _, flight in mine + others:
            await flight.done.wait()
        return [d for d, flight in mine + others if flight.error is not None]

    def fetch_bundle(self, parts: list[tuple[Digest, list[Digest]]]) -> None:
        """Prefetch blobs (not cached, not in flight) through the parts of a bundle that
        hold them, in order: one request a part, its records stored as they arrive
        (``_fetch_bundle``)."""
        assert self._nursery is not None, "FetchService.run() is not running"
        flights = {
            d: self._new_flight(d, PREFETCH, False, False) for _, blobs in parts for d in blobs
        }
        self._nursery.start_soon(self._fetch_bundle, parts, flights)

    async def _fetch_bundle(
        self, parts: list[tuple[Digest, list[Digest]]], flights: dict[Digest, _Flight]
    ) -> None:
        """Stream a bundle's parts in order and store the blobs of ``flights`` they hold.
        One part at a time: the next is asked for once this one's rest is about a round
        trip away (its ``near_end``), so the link brings the blobs in the order the run
        reads them (two parts at once shared it: the run waited on the first one's blobs
        while the second's came in, then fetched them on its own and had them sent twice).
        A read of a blob whose part is on its way waits for it while the part brings records
        (``_wait_for_part``); of a blob in a part not asked for yet, it fetches the blob at
        once (``_join_or_start``), as it would take over a queued group's. A part none of
        whose blobs is still wanted when its turn comes is not fetched at all. What the
        parts did not bring (the store lacked one, or a stream failed) is fetched in groups
        as a prefetch would."""
        try:
            async with trio.open_nursery() as nursery:
                turn = trio.Event()
                turn.set()
                for part, blobs in parts:
                    await turn.wait()
                    if any(not flights[d].taken and not flights[d].done.is_set() for d in blobs):
                        turn = trio.Event()
                        nursery.start_soon(self._fetch_part, part, blobs, flights, turn.set)
            left = [d for d, f in flights.items() if not f.taken and not f.done.is_set()]
            for start in range(0, len(left), _AFTER_BUNDLE):
                part_flights = {d: flights[d] for d in left[start : start + _AFTER_BUNDLE]}
                await self._fetch_group(part_flights, PREFETCH, False, True)
        finally:
            for d, flight in flights.items():
                if not flight.taken:  # a taken flight is its reader's download to land
                    self._land(d, flight)

    async def _fetch_part(
        self,
        part: Digest,
        blobs: list[Digest],
        flights: dict[Digest, _Flight],
        near_end: Callable[[], None],
    ) -> None:
        """Stream one part of a bundle (which should hold ``blobs``) and store the blobs of
        ``flights`` it brings. The stream stops once none of ``blobs`` is still wanted (a
        part that sends more than it should, or forever, holds nothing up), and after
        ``_PART_DEADLINE``; a part that fails is logged. What it did not bring is left to
        ``_fetch_bundle``. ``near_end`` is called when the rest of the part is about to
        arrive, or (at the latest) when its stream ends."""
        stream = _PartStream()
        for d in blobs:
            if (flight := flights.get(d)) is not None and not flight.done.is_set():
                flight.part = stream

        def pending() -> bool:
            return any(not flights[d].taken and not flights[d].done.is_set() for d in blobs)

        async def store(batch: dict[Digest, Fetched]) -> None:
            mine = {
                d: f
                for d in batch
                if (f := flights.get(d)) is not None
                and not f.taken
                and not f.started  # not one a reader or another part already has
                and not f.done.is_set()
            }
            for flight in mine.values():
                flight.started = True  # its bytes are here: a read waits for them
            self._bundled[2] += sum(len(f.payload) for d, f in batch.items() if d not in mine)
            stream.tick()  # the reads waiting for these wait on their flights now
            await self._store_and_land(batch, mine, PREFETCH)
            if not pending():
                raise _PartDone

        try:
            with trio.move_on_after(_PART_DEADLINE) as deadline:
                async with self._slots[PREFETCH, False]:
                    await self.source.cas.stream_bundle(part, PREFETCH, store, near_end)
            if deadline.cancelled_caught:
                log.info(
                    "bundle part %s: not done in %g s; its blobs go without it",
                    part,
                    _PART_DEADLINE,
                )
            else:
                self._bundled[1] += 1
        except _PartDone:
            self._bundled[1] += 1
        except Exception as exc:  # its blobs go blob by blob, whatever went wrong
            error = exc if isinstance(exc, LazyCafError) else _internal(exc)
            log.info("bundle part %s: %s; its blobs are fetched without it", part, error)
        finally:
            stream.ended = True
            stream.tick()  # its waiting reads fetch what it did not bring
            near_end()

    async def _fetch_group(
        self, flights: dict[Digest, _Flight], priority: Priority, for_peer: bool, to_cas: bool
    ) -> None:
        """Fetch a group with one request per source. ``to_cas``: the group was formed of
        blobs the CAS serves (the route is the one decided when the flights were made)."""
        mine = flights
        try:
            async with self._slots[priority, for_peer]:
                mine = {d: f for d, f in flights.items() if not f.taken}
                for flight in mine.values():
                    flight.started = True
                if not mine:
                    return
                started = time.monotonic()
                streamed = False

                async def store(batch: dict[Digest, Fetched]) -> None:
                    nonlocal streamed
                    if not streamed:  # the request's latency: to its first blobs
                        self._observe_fetch(started, ("cas",))
                        streamed = True
                    await self._store_and_land(batch, mine, priority)

                if to_cas:  # blobs are stored while the rest of the answer arrives
                    got, error = await self.source.cas.fetch_many(
                        list(mine), priority, arrived=store
                    )
                else:
                    got, error = await self.source.fetch_many(list(mine), priority)
                    self._observe_fetch(started, {f.origin for f in got.values()})
            await self._store_and_land(got, mine, priority)
            for d, flight in mine.items():
                if not flight.done.is_set():
                    self._fail(flight, d, error or BlobNotFound(d, self.cas.where))
                    self._land(d, flight)
        except Exception as exc:  # one group must not take the service down
            failure = exc if isinstance(exc, LazyCafError) else _internal(exc)
            for d, flight in mine.items():
                if not flight.done.is_set():
                    self._fail(flight, d, failure)
        finally:
            for d, flight in mine.items():
                self._land(d, flight)
        _log_group_failures(mine)  # not reached when cancelled (the daemon is stopping)

    async def _store_and_land(
        self, batch: dict[Digest, Fetched], flights: dict[Digest, _Flight], priority: Priority
    ) -> None:
        """Store the blobs of ``batch`` this group asked for and has not landed yet (a source
        that sends others, or one twice, is not trusted with them), in runs; each run's
        flights land once it is stored."""
        todo = [
            (d, fetched, flights[d])
            for d, fetched in batch.items()
            if d in flights and not flights[d].done.is_set()
        ]
        for part in _slices(todo):
            await self._store_many(part, priority)
            for d, _, flight in part:
                self._land(d, flight)

    def _verify_and_stage(self, digest: Digest, fetched: Fetched) -> Staged:
        """The one place fetched bytes are verified (a worker thread: hashing, writing)."""
        what = (
            f"peer {fetched.peer}"
            if fetched.peer is not None
            else f"bundle part {fetched.bundle}"
            if fetched.bundle is not None
            else ""
        )
        return self.cache.stage(verify_blob(digest, fetched.encoding, fetched.payload, what=what))

    async def _store(self, digest: Digest, fetched: Fetched, flight: _Flight) -> None:
        """Verify, stage and publish one fetched blob; errors end up in ``flight``. Bytes
        from a peer that do not verify back that peer off and come from the CAS instead."""
        disk = self._disk_for[flight.priority]
        try:
            try:
                staged = await trio.to_thread.run_sync(
                    self._verify_and_stage, digest, fetched, limiter=disk
                )
            except IntegrityError as exc:
                if not fetched.retry_alone:
                    raise
                if fetched.peer is not None:
                    self.source.peer_failed(fetched.peer, str(exc))  # logs the back-off
                else:
                    log.warning("%s; fetching blob %s from the CAS on its own", exc, digest)
                fetched = await self.source.cas.fetch(digest, flight.priority)
                staged = await trio.to_thread.run_sync(
                    self._verify_and_stage, digest, fetched, limiter=disk
                )
        except LazyCafError as exc:
            self._fail(flight, digest, exc)
            return
        except OSError as exc:
            self._fail(flight, digest, _write_failed(digest, exc))
            return
        await self._publish_staged(digest, fetched, staged, flight)

    async def _publish_staged(
        self, digest: Digest, fetched: Fetched, staged: Staged, flight: _Flight
    ) -> None:
        """Publish one staged blob within the budget (``_publish``); the flight succeeds or
        fails with it."""
        try:
            await self._publish(staged, self._disk_for[flight.priority])
        except LazyCafError as exc:
            self._fail(flight, digest, exc)
            return
        except OSError as exc:
            self._fail(flight, digest, _write_failed(digest, exc))
            return
        self._stored(digest, fetched, flight, staged.size)

    async def _store_many(
        self, items: list[tuple[Digest, Fetched, _Flight]], priority: Priority
    ) -> None:
        """``_store`` for several blobs with one thread hop and one index transaction
        (``BlobCache.publish_many``): per blob, two hops and a transaction were most of
        the daemon's CPU on a cold start of small blobs. A blob over the budget waits for
        GC as ``_store``'s do; a peer's blob that does not verify goes ``_store``'s way
        (the peer backed off, the blob fetched from the CAS)."""
        disk = self._disk_for[priority]
        limit = None if self.gc is None else self.gc.policy.budget
        pairs = [(d, fetched) for d, fetched, _ in items]
        outcomes = await trio.to_thread.run_sync(
            self._stage_and_publish, pairs, limit, limiter=disk
        )
        pending = [o for o in outcomes if isinstance(o, Staged)]
        try:
            for (d, fetched, flight), out in zip(items, outcomes, strict=True):
                if isinstance(out, int):
                    self._stored(d, fetched, flight, out)
                elif isinstance(out, Staged):  # over the budget
                    pending.remove(out)
                    await self._publish_staged(d, fetched, out, flight)
                elif isinstance(out, IntegrityError) and fetched.retry_alone:
                    await self._store(d, fetched, flight)
                elif isinstance(out, LazyCafError):
                    self._fail(flight, d, out)
                else:
                    self._fail(flight, d, _write_failed(d, out))
        finally:
            if pending:  # cancelled before their turn: nothing left in tmp/
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_discard_all, self.cache, pending)
        if self.gc is not None and any(isinstance(o, int) for o in outcomes):
            self.gc.notice_commit()

    def _stage_and_publish(
        self, pairs: list[tuple[Digest, Fetched]], limit: int | None
    ) -> list[int | Staged | LazyCafError | OSError]:
        """Verify and stage each blob, then publish them together (a worker thread). Per
        blob: its size once published, the ``Staged`` blob when the budget kept it back, or
        the error that stopped it."""
        out: list[int | Staged | LazyCafError | OSError] = []
        staged: list[Staged] = []
        try:
            for d, fetched in pairs:
                try:
                    blob = self._verify_and_stage(d, fetched)
                except (LazyCafError, OSError) as exc:
                    out.append(exc)
                    continue
                staged.append(blob)
                out.append(blob)
            published = iter(self.cache.publish_many(staged, limit=limit))
        except BaseException:
            _discard_all(self.cache, staged)
            raise
        for i, o in enumerate(out):
            if isinstance(o, Staged):
                done = next(published)
                out[i] = o.size if done is True else o if done is False else done
        return out

    def _stored(self, digest: Digest, fetched: Fetched, flight: _Flight, size: int) -> None:
        """A fetched blob is in the cache: its flight succeeds; count it."""
        flight.size = size
        flight.stored = True
        if fetched.origin == "cas" and fetched.encoding == framing.ZSTD:
            self.recent.put(digest, fetched.encoding, fetched.payload)
        self._fetches += 1
        self._bytes_fetched += size
        self._bundled[0] += fetched.bundle is not None
        counts = self._by_origin[fetched.origin]
        counts[0] += 1
        counts[1] += size
        if flight.priority == PREFETCH:
            self._prefetched += 1
            self._bytes_prefetched += size
            if not flight.for_peer:
                self._note_unread(digest, size)

    def _note_unread(self, digest: Digest, size: int) -> None:
        if digest in self._unread:
            return
        if len(self._unread) >= _UNREAD_CAP:  # forget the oldest: stays counted as wasted
            oldest = next(iter(self._unread))
            del self._unread[oldest]
        self._unread[digest] = size
        self._unread_bytes += size

    def _observe_fetch(self, started: float, origins: Iterable[str]) -> None:
        """One request to a source took this long (a group answered by several origins
        counts once for each)."""
        took = time.monotonic() - started
        for origin in origins:
            self.metrics.fetch_seconds.labels(origin).observe(took)

    def _fail(self, flight: _Flight, digest: Digest, exc: LazyCafError) -> None:
        """Fail a flight (its caller logs: one line per blob or per group)."""
        self._failures += 1
        self._failed_by[failure_cause(exc)] += 1
        flight.error = exc
        if isinstance(exc, CacheFull) and self.gc is not None:
            self.gc.notice_disk_full()

    def _land(self, digest: Digest, flight: _Flight) -> None:
        """End a flight: forget it and wake its waiters (idempotent). A flight that ends
        neither stored nor failed was cancelled (the daemon is stopping)."""
        if flight.done.is_set():
            return
        if not flight.stored and flight.error is None:
            flight.error = Unavailable(f"fetch of blob {digest} was cancelled")
        key = (digest, flight.for_peer)
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.done.set()

    async def _download(self, digest: Digest, flight: _Flight) -> None:
        try:
            async with self._slots[flight.priority, flight.for_peer]:
                flight.started = True
                started = time.monotonic()
                fetched = await self._route(flight).fetch(digest, flight.priority)
                self._observe_fetch(started, (fetched.origin,))
            await self._store(digest, fetched, flight)
        except LazyCafError as exc:
            self._fail(flight, digest, exc)
        except OSError as exc:  # a local CAS directory that failed
            self._fail(flight, digest, Unavailable(f"fetch of blob {digest} failed: {exc}"))
        except Exception as exc:  # one fetch must not take the service down
            self._fail(flight, digest, _internal(exc))
        finally:
            failed = flight.error  # before ``_land``: a cancelled flight is not logged
            self._land(digest, flight)
        if failed is not None:
            _log_failure(f"fetch of blob {digest}", failed)

    async def _publish(self, staged: Staged, disk: trio.CapacityLimiter) -> None:
        """Publish within the budget, waiting for GC passes to make room; after three
        passes that could not (only pinned blobs left), go over it rather than fail."""
        gc = self.gc
        try:
            for _ in range(3):
                limit = None if gc is None else gc.policy.budget
                if await trio.to_thread.run_sync(
                    functools.partial(self.cache.publish, staged, limit=limit),
                    limiter=disk,
                ):
                    break
                assert gc is not None
                await gc.collect(room=staged.size)
            else:
                log.warning("cache over budget: only pinned blobs left to evict")
                await trio.to_thread.run_sync(
                    functools.partial(self.cache.publish, staged, limit=None), limiter=disk
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.cache.discard, staged)
            raise
        if gc is not None:
            gc.notice_commit()


async def _wait_for_part(flight: _Flight, part: _PartStream) -> None:
    """A read of a blob whose bundle part is on its way: wait until its bytes are here
    (the flight started: the part's store has them), the part ended, or no records came
    for ``_PART_STALL`` (a stalled stream; the read then fetches the blob on its own).
    Waiting beats fetching alone: the part brings the blobs in the order the run reads
    them, and a blob fetched alone shares the link with it, then comes twice."""
    while not (flight.started or flight.done.is_set() or part.ended):
        with trio.move_on_after(_PART_STALL) as waited:
            await part.changed.wait()
        if waited.cancelled_caught:
            return


class _PartDone(Exception):
    """A bundle part's stream brought every blob still wanted of it: stop reading."""


def _log_failure(what: str, exc: LazyCafError) -> None:
    """One warning per failure, except while the CAS's breaker is open: it logged once."""
    if isinstance(exc, CasCircuitOpen):
        log.debug("%s failed: %s", what, exc)
    else:
        log.warning("%s failed: %s", what, exc)


def _log_group_failures(flights: dict[Digest, _Flight]) -> None:
    """One line per kind of error of a group's failed flights (a peer's request of 1,024
    blobs from a dead CAS is one line, not 1,024)."""
    by_error: dict[str, tuple[LazyCafError, list[Digest]]] = {}
    for d, flight in flights.items():
        if flight.error is not None and not flight.stored:
            key = str(flight.error) if not isinstance(flight.error, BlobNotFound) else "absent"
            by_error.setdefault(key, (flight.error, []))[1].append(d)
    for exc, failed in by_error.values():
        if len(failed) == 1:
            _log_failure(f"fetch of blob {failed[0]}", exc)
        else:
            _log_failure(f"fetch of {len(failed)} blobs (first {failed[0]})", exc)


def _slices(
    items: list[tuple[Digest, Fetched, _Flight]],
) -> Iterator[list[tuple[Digest, Fetched, _Flight]]]:
    """A group's blobs in runs of at most ``_STORE_SLICE`` blobs or ``_STORE_SLICE_BYTES``
    (at least one): each run's readers wake when it is stored, not when the whole group is."""
    part: list[tuple[Digest, Fetched, _Flight]] = []
    size = 0
    for item in items:
        if part and (len(part) >= _STORE_SLICE or size >= _STORE_SLICE_BYTES):
            yield part
            part, size = [], 0
        part.append(item)
        size += len(item[1].payload)
    if part:
        yield part


def _discard_all(cache: BlobCache, staged: Iterable[Staged]) -> None:
    for s in staged:
        cache.discard(s)


def _write_failed(digest: Digest, exc: OSError) -> Unavailable:
    return Unavailable(f"cache write of blob {digest} failed: {exc}")


def _internal(exc: Exception) -> Unavailable:
    log.error("fetch failed on an unexpected error", exc_info=exc)
    return Unavailable(f"fetch failed: {type(exc).__name__}: {exc}")
