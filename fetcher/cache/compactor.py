"""Compressing, once fetching has gone quiet, the blobs the cache wrote plain.

The host cache writes fetched blobs without Btrfs compression (``BlobCache``: compression
deferred), so a cold start does not pay zstd in the kernel's writeback threads while the job
waits. The compactor is the other half: a daemon task that, after ``IDLE_S`` seconds with no
fetch in flight, hands the plain blobs to ``BlobCache.compress`` in batches of about
``BATCH_BYTES`` (each in a worker thread), at most ``RATE`` bytes a second on average, so a
job that computes after its start-up shares a core with it for a while at most. A fetch
that starts stops it at the next batch (quiet is sampled every 0.5 s), unless more than
``BACKLOG_BYTES`` wait: a host that never goes quiet (a daemon serving peers all day) still
compresses, at the same rate, so the cache's plain bytes stay bounded. An index error (a
full disk) puts the batch back and waits 30 s: the compactor never stops the daemon.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Final

import trio

from fetcher.cache.blobcache import BlobCache
from lazycaf.core.digest import Digest
from lazycaf.core.errors import LazyCafError

__all__ = ["BACKLOG_BYTES", "BATCH_BYTES", "IDLE_S", "RATE", "Compactor"]

log = logging.getLogger(__name__)

IDLE_S: Final = 3.0  # seconds with no fetch in flight before compressing starts
BATCH_BYTES: Final = 16 << 20
RATE: Final = 64 << 20  # bytes a second, averaged over batches (zstd ~1 CPU-s per ~200 MB)
BACKLOG_BYTES: Final = 1 << 30  # plain bytes waiting past which busy does not hold it back
_POLL_S: Final = 0.5
_BACKOFF_S: Final = 30.0  # after an index error (a full disk)


class Compactor:
    def __init__(
        self,
        cache: BlobCache,
        busy: Callable[[], bool],
        *,
        idle_s: float = IDLE_S,
        backlog_bytes: int = BACKLOG_BYTES,
    ) -> None:
        self.cache = cache
        self.busy = busy
        self.idle_s = idle_s
        self.backlog_bytes = backlog_bytes
        self._queue: collections.deque[tuple[Digest, int]] = collections.deque()
        self._queued_bytes = 0

    @property
    def pending(self) -> int:
        """Plain blobs known and not yet compressed."""
        return len(self._queue)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.cache.writes_plain and not self._take():
            return  # nothing written plain, and nothing will be
        quiet_since: float | None = None
        while True:
            await trio.sleep(_POLL_S)
            self._take()
            now = trio.current_time()
            backlog = self._queued_bytes > self.backlog_bytes
            if not self._queue or (self.busy() and not backlog):
                quiet_since = None
                continue
            if quiet_since is None:
                quiet_since = now
            if now - quiet_since < self.idle_s and not backlog:
                continue
            batch, size = [], 0
            while self._queue and size < BATCH_BYTES:
                batch.append(self._queue.popleft())
                size += batch[-1][1]
            self._queued_bytes -= size
            try:
                done = await trio.to_thread.run_sync(self.cache.compress, batch)
            except (LazyCafError, OSError) as exc:  # the index could not be written (full disk)
                log.warning(
                    "compressing %d blobs: %s; trying again in %g s", len(batch), exc, _BACKOFF_S
                )
                self._queue.extendleft(reversed(batch))
                self._queued_bytes += size
                await trio.sleep(_BACKOFF_S)
                continue
            log.debug("compressed %d blobs, %d bytes; %d to go", len(batch), done, self.pending)
            await trio.sleep(done / RATE)

    def _take(self) -> int:
        landed = self.cache.take_plain()
        self._queue.extend(landed)
        self._queued_bytes += sum(size for _, size in landed)
        return len(landed)
