"""Running GC on the host cache: in the daemon as a background service, or offline.

A pass snapshots the index, plans with ``fetcher.cache.policy.plan_eviction`` and deletes in batches
(``BlobCache.evict``: files, then one index transaction per batch) in a worker thread of
its own, so on-demand reads, which never wait for GC, keep being served between batches.
A blob file deleted while a mount has it open stays readable through that descriptor; the
mount's next open misses and asks the daemon, which fetches the blob again.

Protected from eviction: every blob of a pinned executable (and its manifest); treated as
hot (evicted only after every cold blob): the blobs mounts queued for prefetch (their
profiles' hot sets) and the manifests of executables this cache has mounted.

Where the budget comes from: ``--cache-size`` (kept in the index's settings so the next
daemon, ``cache gc`` and ``cache status`` use it too), else ``DEFAULT_BUDGET`` or half of
the cache's filesystem, whichever is smaller.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from fetcher.cache.blobcache import BlobCache
from fetcher.cache.policy import DEFAULT_BUDGET, GcPolicy, plan_eviction
from lazycaf.core.digest import Digest
from lazycaf.core.errors import LazyCafError
from lazycaf.core.manifest import Manifest
from lazycaf.disk.syncfs import syncfs
from lazycaf.host.index import Index
from lazycaf.host.paths import CacheLayout

__all__ = [
    "GarbageCollector",
    "GcResult",
    "collect_once",
    "configured_policy",
    "pinned_blobs",
    "resolve_policy",
]

log = logging.getLogger(__name__)
_BATCH: Final = 256


@dataclass(frozen=True)
class GcResult:
    evicted: int
    bytes_freed: int
    usage: int
    budget: int
    pinned_blobs: int


def _default_budget(root: Path) -> int:
    st = os.statvfs(root)
    return min(DEFAULT_BUDGET, st.f_blocks * st.f_frsize // 2)


def configured_policy(index: Index, root: Path) -> tuple[GcPolicy, str]:
    """The cache's policy and where it came from (``configured`` or ``default``)."""
    text = index.get_setting("gc_policy")
    if text:
        return GcPolicy(**json.loads(text)), "configured"
    return GcPolicy(_default_budget(root)), "default"


def resolve_policy(
    index: Index, root: Path, *, budget: int | None, high: float | None, low: float | None
) -> GcPolicy:
    """The daemon's policy: options given now (and remembered), else the remembered ones."""
    current, _ = configured_policy(index, root)
    if budget is None and high is None and low is None:
        return current
    policy = GcPolicy(
        budget or current.budget,
        current.high if high is None else high,
        current.low if low is None else low,
    )
    index.set_setting(
        "gc_policy", json.dumps({"budget": policy.budget, "high": policy.high, "low": policy.low})
    )
    return policy


def pinned_blobs(
    root: Path, index: Index, memo: dict[Digest, frozenset[Digest]] | None = None
) -> set[Digest]:
    """Every blob a pinned executable needs, with its manifest (sync: reads manifests)."""
    memo = {} if memo is None else memo
    pinned: set[Digest] = set()
    for exe, rec in index.executables().items():
        if rec.pins <= 0:
            continue
        pinned.add(exe)
        if exe not in memo:
            path = CacheLayout(root).blob(exe)
            try:
                memo[exe] = frozenset(Manifest.decode(path.read_bytes()).blobs())
            except (OSError, LazyCafError) as exc:  # not fetched yet: only the manifest
                log.warning("pinned executable %s: manifest unreadable (%s)", exe, exc)
                continue
        pinned |= memo[exe]
    return pinned


def _plan(
    cache: BlobCache,
    policy: GcPolicy,
    hot: set[Digest],
    memo: dict[Digest, frozenset[Digest]],
    *,
    room: int,
    disk_full: bool,
) -> tuple[list[Digest], int]:
    pinned = pinned_blobs(cache.root, cache.index, memo)
    hot = hot | set(cache.index.executables())
    # a full disk: free a share of what is there even below the budget
    budget = min(policy.budget, cache.usage) if disk_full else policy.budget
    plan = plan_eviction(cache.index.items(), budget, policy.low, hot, pinned, room=room)
    return plan, len(pinned)


def _finish(cache: BlobCache) -> None:
    """Make deletions durable (Btrfs reuses freed extents only after a commit) and forget
    unpinned executables whose manifest is gone."""
    syncfs(cache.root)
    gone = [
        d for d, rec in cache.index.executables().items() if rec.pins == 0 and d not in cache.index
    ]
    cache.index.forget_executables(gone)


def collect_once(
    cache: BlobCache,
    policy: GcPolicy,
    *,
    disk_full: bool = False,
    on_batch: Callable[[int, int], None] = lambda evicted, of: None,
) -> GcResult:
    """One whole pass, synchronously (``lazycaf cache gc`` without a daemon; the caller
    holds the cache's lock, so it is the only writer). ``on_batch(evicted, of)`` is called
    after each batch evicted: blobs evicted so far, of how many planned."""
    plan, pinned = _plan(cache, policy, set(), {}, room=0, disk_full=disk_full)
    freed = 0
    for i in range(0, len(plan), _BATCH):
        freed += cache.evict(plan[i : i + _BATCH])
        on_batch(min(i + _BATCH, len(plan)), len(plan))
    _finish(cache)
    return GcResult(len(plan), freed, cache.usage, policy.budget, pinned)


class GarbageCollector:
    """The daemon's GC service. Invariants: one pass at a time; a pass started after
    ``notice_*`` sees every blob committed before it."""

    def __init__(self, cache: BlobCache, policy: GcPolicy, hot: Callable[[], set[Digest]]) -> None:
        self.cache = cache
        self.policy = policy
        self._hot = hot
        self._wakeup = trio.Event()
        self._lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)  # GC's own disk thread
        self._disk_full = False
        self._memo: dict[Digest, frozenset[Digest]] = {}
        self.runs = self.evicted = self.bytes_evicted = 0

    def statistics(self) -> dict[str, int]:
        return {
            "budget": self.policy.budget,
            "usage": self.cache.usage,
            "gc_runs": self.runs,
            "gc_evicted": self.evicted,
            "gc_bytes_evicted": self.bytes_evicted,
        }

    def notice_commit(self) -> None:
        if self.policy.needs_collection(self.cache.usage):
            self._wakeup.set()

    def notice_disk_full(self) -> None:
        self._disk_full = True
        self._wakeup.set()

    def pins_changed(self) -> None:
        self._memo.clear()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            try:
                await self.collect()
            except LazyCafError as exc:
                log.warning("GC pass failed: %s", exc)

    async def collect(self, *, room: int = 0) -> GcResult:
        """One pass down to the low watermark (minus ``room`` bytes about to arrive)."""
        async with self._lock:
            disk_full, self._disk_full = self._disk_full, False
            hot = self._hot()  # read here, on the trio thread that owns it
            plan, pinned = await trio.to_thread.run_sync(
                lambda: _plan(
                    self.cache,
                    self.policy,
                    hot,
                    self._memo,
                    room=room,
                    disk_full=disk_full,
                ),
                limiter=self._limiter,
            )
            freed = 0
            for start in range(0, len(plan), _BATCH):
                batch = plan[start : start + _BATCH]
                freed += await trio.to_thread.run_sync(
                    self.cache.evict, batch, limiter=self._limiter
                )
            if plan:
                await trio.to_thread.run_sync(_finish, self.cache, limiter=self._limiter)
                self.runs += 1
                self.evicted += len(plan)
                self.bytes_evicted += freed
                log.info(
                    "GC evicted %d blobs (%d bytes); cache %d of %d bytes%s",
                    len(plan),
                    freed,
                    self.cache.usage,
                    self.policy.budget,
                    " (disk full)" if disk_full else "",
                )
            return GcResult(len(plan), freed, self.cache.usage, self.policy.budget, pinned)
