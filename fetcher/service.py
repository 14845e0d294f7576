"""``ensure(digest)``: make a blob present in the host cache, fetching it at most once.

Cache first, then the CAS. Concurrent requests for one digest, from any number of mounts,
share one download (single flight); the download runs in the service's own nursery, so a
requester that gives up does not cancel it for the others. Downloads are verified before
they enter the cache.

Priorities: on-demand reads and prefetch use separate download slots and separate CAS
clients (so separate HTTP connection pools): a read never waits behind prefetch traffic for
a slot or a connection, and a read of a blob that prefetch has queued but not started
fetches it at once (the queue skips it later).

Budget: a verified blob is staged in ``tmp/`` and published only if the cache stays within
its budget; otherwise the download waits for a GC pass that makes room (GC normally runs
ahead of that, from the high watermark). A full disk fails the fetch with ``CacheFull``
(EIO at the reader) and wakes GC. Cache hits are remembered (``take_touched``) and written
as access times in batches, never one LMDB write per read.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Final

import trio

from fetcher.blobcache import BlobCache, Staged
from fetcher.collector import GarbageCollector
from lazycaf.cas import CAS
from lazycaf.digest import Digest
from lazycaf.errors import BlobNotFound, CacheFull, LazyCafError, Unavailable

__all__ = ["DEMAND", "PREFETCH", "FetchService", "FetchStatistics"]

log = logging.getLogger(__name__)
DEMAND: Final = 0
PREFETCH: Final = 1


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


class _Flight:
    __slots__ = ("done", "error", "priority", "size")

    def __init__(self, priority: int) -> None:
        self.done = trio.Event()
        self.error: LazyCafError | None = None
        self.size = 0
        self.priority = priority


class FetchService:
    """Single-flight fetching into a ``BlobCache``. Use inside ``run()``.

    ``cas`` serves on-demand reads; ``prefetch_cas`` (default: ``cas``) serves prefetch.
    """

    def __init__(
        self,
        cache: BlobCache,
        cas: CAS,
        *,
        prefetch_cas: CAS | None = None,
        concurrency: int = 16,
        prefetch_concurrency: int = 8,
        gc: GarbageCollector | None = None,
    ) -> None:
        self.cache = cache
        self.gc = gc
        self._touched: set[Digest] = set()
        self.cas = cas
        self.prefetch_cas = prefetch_cas or cas
        self._slots = {
            DEMAND: trio.CapacityLimiter(concurrency),
            PREFETCH: trio.CapacityLimiter(prefetch_concurrency),
        }
        self._disk = trio.CapacityLimiter(4)
        self._flights: dict[Digest, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._hits = self._misses = self._fetches = self._failures = 0
        self._bytes_fetched = self._bytes_served = 0
        self._prefetched = self._bytes_prefetched = 0
        self._wait = 0.0
        self.queued = 0  # set by the prefetch queue

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
        )

    def is_cached(self, digest: Digest) -> bool:
        return self._cached_size(digest) is not None

    def in_flight(self, digest: Digest) -> bool:
        return digest in self._flights

    async def ensure(self, digest: Digest, *, priority: int = DEMAND) -> int:
        """Return the blob's size once it is in the cache; raise the fetch's error."""
        # An LMDB get is a memory-mapped lookup and the stat hits the dentry cache: cheaper
        # inline than the ~100 us of a thread hop, on the path every request takes.
        record = self._cached_size(digest)
        if record is not None:
            if priority == DEMAND:
                self._touched.add(digest)
                self._hits += 1
                self._bytes_served += record
            return record
        if priority == DEMAND:
            self._misses += 1
        start = time.monotonic()
        flight = self._flights.get(digest)
        if flight is None:
            flight = self._flights[digest] = _Flight(priority)
            assert self._nursery is not None, "FetchService.run() is not running"
            self._nursery.start_soon(self._download, digest, flight)
        await flight.done.wait()
        if priority == DEMAND:
            self._wait += time.monotonic() - start
        if flight.error is not None:
            raise flight.error
        if priority == DEMAND:
            self._bytes_served += flight.size
        return flight.size

    def touch(self, digests: list[Digest]) -> None:
        """Note reads the daemon did not serve itself (mounts read cached blobs directly)."""
        self._touched.update(digests)

    def take_touched(self) -> set[Digest]:
        """The blobs read since the last call (for one batched access-time write)."""
        touched, self._touched = self._touched, set()
        return touched

    def _cached_size(self, digest: Digest) -> int | None:
        rec = self.cache.index.get(digest)
        if rec is None or not self.cache.path(digest).exists():
            return None
        return rec.size

    async def prefetch_many(self, digests: list[Digest]) -> None:
        """Prefetch several blobs with one CAS request (``get_many_encoded``): per-request
        costs, not bytes, bound prefetch of many small blobs. Blobs already cached or in
        flight are skipped; a failure is logged per blob (a later read fetches on demand)."""
        todo = list(
            dict.fromkeys(d for d in digests if not self.is_cached(d) and d not in self._flights)
        )
        if not todo:
            return
        flights = {d: _Flight(PREFETCH) for d in todo}
        self._flights.update(flights)
        try:
            async with self._slots[PREFETCH]:
                got = await self.prefetch_cas.get_many_encoded(todo)
            for d in todo:
                if d not in got:
                    self._fail(flights[d], d, BlobNotFound(d, self.prefetch_cas.where))
                    continue
                encoding, payload = got.pop(d)
                try:
                    staged = await trio.to_thread.run_sync(
                        self.cache.stage, d, encoding, payload, limiter=self._disk
                    )
                    await self._publish(staged)
                except LazyCafError as exc:
                    self._fail(flights[d], d, exc)
                except OSError as exc:
                    self._fail(flights[d], d, Unavailable(f"cache write of blob {d} failed: {exc}"))
                else:
                    flights[d].size = staged.size
                    self._fetches += 1
                    self._prefetched += 1
                    self._bytes_fetched += staged.size
                    self._bytes_prefetched += staged.size
                self._land(d, flights[d])
        except LazyCafError as exc:
            for d, flight in flights.items():
                if not flight.done.is_set():
                    self._fail(flight, d, exc)
        finally:
            for d, flight in flights.items():
                self._land(d, flight)

    def _fail(self, flight: _Flight, digest: Digest, exc: LazyCafError) -> None:
        self._failures += 1
        flight.error = exc
        log.warning("fetch of blob %s failed: %s", digest, exc)
        if isinstance(exc, CacheFull) and self.gc is not None:
            self.gc.notice_disk_full()

    def _land(self, digest: Digest, flight: _Flight) -> None:
        """End a flight: forget it and wake its waiters (idempotent)."""
        if flight.done.is_set():
            return
        if self._flights.get(digest) is flight:
            del self._flights[digest]
        flight.done.set()

    async def _download(self, digest: Digest, flight: _Flight) -> None:
        cas = self.prefetch_cas if flight.priority == PREFETCH else self.cas
        try:
            async with self._slots[flight.priority]:
                encoding, payload = await cas.get_encoded(digest)
                staged = await trio.to_thread.run_sync(
                    self.cache.stage, digest, encoding, payload, limiter=self._disk
                )
            await self._publish(staged)
            flight.size = staged.size
            self._fetches += 1
            self._bytes_fetched += flight.size
            if flight.priority == PREFETCH:
                self._prefetched += 1
                self._bytes_prefetched += flight.size
        except LazyCafError as exc:
            self._failures += 1
            flight.error = exc
            log.warning("fetch of blob %s failed: %s", digest, exc)
            if isinstance(exc, CacheFull) and self.gc is not None:
                self.gc.notice_disk_full()
        except OSError as exc:
            self._failures += 1
            flight.error = Unavailable(f"cache write of blob {digest} failed: {exc}")
            log.warning("cache write of blob %s failed: %s", digest, exc)
        finally:
            del self._flights[digest]
            flight.done.set()

    async def _publish(self, staged: Staged) -> None:
        """Publish within the budget, waiting for GC passes to make room; after three
        passes that could not (only pinned blobs left), go over it rather than fail."""
        gc = self.gc
        try:
            for _ in range(3):
                limit = None if gc is None else gc.policy.budget
                if await trio.to_thread.run_sync(
                    functools.partial(self.cache.publish, staged, limit=limit),
                    limiter=self._disk,
                ):
                    break
                assert gc is not None
                await gc.collect(room=staged.size)
            else:
                log.warning("cache over budget: only pinned blobs left to evict")
                await trio.to_thread.run_sync(
                    functools.partial(self.cache.publish, staged, limit=None), limiter=self._disk
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.cache.discard, staged)
            raise
        if gc is not None:
            gc.notice_commit()
