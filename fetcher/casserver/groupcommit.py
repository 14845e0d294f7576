"""Group commit for the CAS server: the blobs of concurrent PUTs made durable by one syncfs.

A PUT stages its verified blob in ``tmp/`` (``CasDir.stage_encoded``, in a worker thread) and
then waits in ``GroupCommitter.commit``. The committer task takes every blob staged since its
last round and publishes them together in a worker thread (``CasDir.publish``: one ``syncfs``,
then one rename each), then wakes their waiters. While one round runs, the next one gathers,
so the 8 PUTs a client keeps in flight share a syncfs instead of paying one fsync each, and a
PUT is still answered only once its blob is durable and visible.

The committer is a service (``run`` takes ``task_status``); the app starts it from its ASGI
lifespan. Without a running committer (an app driven without lifespan) each blob is
published alone, so nothing waits forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from lazycaf.cas.casdir import CasDir, Staged
from lazycaf.core.errors import CasUnavailable

__all__ = ["CommitStatistics", "GroupCommitter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitStatistics:
    rounds: int  # publishes run (one syncfs each)
    blobs: int  # blobs published (new or found already stored)
    waiting: int  # blobs staged and queued for the next round


class _Waiter:
    __slots__ = ("done", "error", "staged", "stored")

    def __init__(self, staged: Staged) -> None:
        self.staged = staged
        self.done = trio.Event()
        self.stored = False
        self.error: str | None = None


class GroupCommitter:
    """Publishes staged blobs in rounds.

    Invariants: every waiter queued is woken exactly once, after its blob was published (or
    dropped because it was already stored) or with an error, in which case its temp file is
    gone; a round publishes every blob queued before it started; one round runs at a time.
    """

    def __init__(self, store: CasDir) -> None:
        self._store = store
        self._queue: list[_Waiter] = []
        self._wakeup = trio.Event()
        self._running = False
        self._limiter = trio.CapacityLimiter(1)  # the committer's own disk thread
        self._rounds = 0
        self._blobs = 0

    def statistics(self) -> CommitStatistics:
        return CommitStatistics(self._rounds, self._blobs, len(self._queue))

    async def commit(self, staged: Staged) -> bool:
        """Wait until ``staged`` is durable and visible; True if it is new. A failed round
        raises ``CasUnavailable``. Cancelling the wait does not cancel the commit."""
        if not self._running:
            try:
                (stored,) = await self._publish([staged])
            except OSError as exc:
                reason = f"cannot store blob: {exc.strerror or exc}"
                raise CasUnavailable(str(self._store.root), reason) from exc
            return stored
        waiter = _Waiter(staged)
        self._queue.append(waiter)
        self._wakeup.set()
        await waiter.done.wait()
        if waiter.error is not None:
            raise CasUnavailable(str(self._store.root), waiter.error)
        return waiter.stored

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run rounds until cancelled."""
        self._running = True
        task_status.started()
        group: list[_Waiter] = []
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                group, self._queue = self._queue, []
                await self._round(group)
                group = []
        finally:
            self._running = False
            # Cancelled with blobs queued: fail their waiters and drop their temp files.
            left, self._queue = group + self._queue, []
            for waiter in left:
                waiter.error = "the server is shutting down"
                waiter.done.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._store.discard, [w.staged for w in left])

    async def _round(self, group: list[_Waiter]) -> None:
        try:
            # Not abandoned on cancel: the round completes and its waiters hear of it.
            results = await self._publish([w.staged for w in group])
        except OSError as exc:
            log.error("group commit of %d blobs failed: %s", len(group), exc)
            for waiter in group:
                waiter.error = f"cannot store blob: {exc.strerror or exc}"
                waiter.done.set()
            return
        for waiter, stored in zip(group, results, strict=True):
            waiter.stored = stored
            waiter.done.set()

    async def _publish(self, staged: list[Staged]) -> list[bool]:
        results = await trio.to_thread.run_sync(self._store.publish, staged, limiter=self._limiter)
        self._rounds += 1
        self._blobs += len(staged)
        return results
