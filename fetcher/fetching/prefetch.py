"""The prefetch queue: blobs a mount will probably read soon, fetched in order in the
background, always below on-demand reads.

Mounts add digests in their profile's hot-set order; workers take them first in, first out,
a few at a time (8; with peers 8 per peer up to 64, since a group is split by home peer and
every request has its own cost), and fetch each group with one request per source
(``FetchService.fetch_many``), which uses its own download slots and connections. A digest
in flight (a read got to it first) is skipped, one the cache's index lists is warmed (below).
Failures are logged and dropped: a later read fetches on demand.

Blobs of a hot set that are cached already are read into the page cache in the same order
(``BlobCache.warm``): a host whose cache outlived its page cache starts the run from memory
(the sample's cold start from a full cache: run 0.55 -> 0.35 s).

A hot set that comes with a bundle (``add_bundle``) is fetched with one request a part of
the bundle, one part after the other, streamed and stored as it arrives; a read that needs
one of its blobs waits for the part if it is on its way, else fetches that blob on its own
(``FetchService.fetch_bundle``).

Order matters more than width: a run asks for the hot set's first blobs within tens of
milliseconds of the mount. So few workers (3) take groups that start small when the queue
was idle (1, 2, 4, then the full group): the first blobs land alone instead of sharing the
CPU and the link with sixty others (measured on the sample: the interpreter's first blob
waited 0.13-0.17 s behind 8 groups of 8, and the whole cold start went 1.1 -> 0.8 s).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import trio

from fetcher.fetching.service import FetchService
from lazycaf.core.digest import Digest
from lazycaf.core.errors import LazyCafError

__all__ = ["PEER_WORKERS", "WORKERS", "PrefetchQueue"]

_BATCH = 8  # blobs per CAS request: few enough that the first ones land early
WORKERS: Final = 3  # groups in flight: few, so the first blobs land first
_BUNDLE_WORTH: Final = 0.5  # a bundle is streamed when at least this share of it is missing
PEER_WORKERS: Final = 8  # with peers a group waits for its slowest home: keep more in flight

log = logging.getLogger(__name__)


class PrefetchQueue:
    """Invariant: a digest is queued at most once; ``service.queued`` is the queue length."""

    def __init__(
        self,
        service: FetchService,
        *,
        workers: int = WORKERS,
        batch: Callable[[], int] | None = None,
    ) -> None:
        self.service = service
        self._workers = workers
        self._batch = batch or (lambda: _BATCH)
        self._queue: OrderedDict[Digest, None] = OrderedDict()
        self._wakeup = trio.Event()
        self._ramp = 1  # the next group's size cap: 1 after idle, doubling up to the batch
        self._nursery: trio.Nursery | None = None

    def add(self, digests: list[Digest]) -> int:
        """Queue digests not cached yet, in order, and warm the cached ones; returns how
        many were queued."""
        added = 0
        cached: list[Digest] = []
        for d in digests:
            if d in self._queue or self.service.in_flight(d):
                continue
            if self.service.indexed(d):
                cached.append(d)
                continue
            self._queue[d] = None
            added += 1
        self.service.queued = len(self._queue)
        self._wakeup.set()
        if cached and self._nursery is not None:
            self._nursery.start_soon(self._warm, cached)
        return added

    def _requeue(self, gone: list[Digest]) -> None:
        """Queue blobs the index lists whose files ``_warm`` did not find."""
        for d in gone:
            if d not in self._queue and not self.service.in_flight(d):
                self._queue[d] = None
        self.service.queued = len(self._queue)
        self._wakeup.set()

    def add_bundle(self, parts: list[tuple[Digest, list[Digest]]]) -> int:
        """Queue the blobs of a bundle's parts (``lazycaf.cas.bundle``; each part with the
        blobs wanted of it): those not cached, queued or in flight are fetched with one
        request a part, unless they are under ``_BUNDLE_WORTH`` of them (the host holds
        most: they are queued as ``add`` does). With peers, blob by blob (``add``): each
        blob then crosses the CAS link once per cluster, which a bundle per host would undo."""
        wanted = [d for _, blobs in parts for d in blobs]
        if self.service.source.peers is not None:
            return self.add(wanted)
        todo: list[tuple[Digest, list[Digest]]] = []
        cached: list[Digest] = []
        seen: set[Digest] = set()
        for part, blobs in parts:
            mine = []
            for d in blobs:
                if d in seen or d in self._queue or self.service.in_flight(d):
                    continue
                seen.add(d)
                if self.service.indexed(d):
                    cached.append(d)
                else:
                    mine.append(d)
            if mine:
                todo.append((part, mine))
        queued = sum(len(blobs) for _, blobs in todo)
        if queued < _BUNDLE_WORTH * len(wanted):  # mostly here: the bundle would bring more
            queued = self.add([d for _, blobs in todo for d in blobs])  # than it saves
        else:
            self.service.fetch_bundle(todo)
        if cached and self._nursery is not None:
            self._nursery.start_soon(self._warm, cached)
        return queued

    async def _warm(self, digests: list[Digest]) -> None:
        """Cached blobs of a hot set: into the page cache, in order, ahead of the run; those
        whose files are gone are fetched after all."""
        if gone := await trio.to_thread.run_sync(self.service.cache.warm, digests):
            self._requeue(gone)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self._workers):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                self._ramp = 1
                self._wakeup = trio.Event() if self._wakeup.is_set() else self._wakeup
                await self._wakeup.wait()
                continue
            size = min(self._batch(), self._ramp, len(self._queue))
            self._ramp *= 2
            batch = [self._queue.popitem(last=False)[0] for _ in range(size)]
            self.service.queued = len(self._queue)
            try:
                await self.service.fetch_many(batch)
            except LazyCafError as exc:
                log.info("prefetch of %d blobs dropped: %s", len(batch), exc)
