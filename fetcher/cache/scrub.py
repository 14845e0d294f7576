"""Scrubbing the host cache: rehash every indexed blob, drop those that no longer verify.

A blob is verified once, before it enters the cache; after that only its unsynced copies are
checked again (``BlobCache.reconcile`` at daemon start). A file changed on disk later (a
failing disk, a stray write by root) would be served as it is. ``scrub`` reads every blob the
index names, at most ``rate`` bytes a second, and drops (``BlobCache.drop``) each one whose
bytes do not hash to its name, or that cannot be read (Btrfs answers EIO for an extent whose
data checksum fails), or whose file is gone. A dropped blob is fetched again on its next
read. Before reading a file it asks the kernel to drop the file's clean cached pages, so the
bytes come from the disk, not from a page cache filled when the blob was written.

Sync code: the daemon runs it in a worker thread (``check`` raises when the request is
cancelled); ``lazycaf cache verify`` without a daemon runs it holding the daemon's lock.
Blob files that the index does not name are left to ``reconcile``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from fetcher.cache.blobcache import BlobCache
from lazycaf.core.digest import Digest, Hasher

__all__ = ["Scrubbed", "scrub"]

_READ: Final = 1 << 20
_PAUSE: Final = 0.1  # longest single sleep of the rate limit (``check`` runs between them)


@dataclass(frozen=True)
class Scrubbed:
    """``checked`` blobs (``bytes`` read); ``bad`` ones dropped: ``corrupt`` (read, wrong
    digest), ``unreadable`` (an I/O error), ``missing`` (indexed, no file)."""

    checked: int
    bytes: int
    corrupt: list[Digest] = field(default_factory=list)
    unreadable: list[Digest] = field(default_factory=list)
    missing: list[Digest] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return len(self.corrupt) + len(self.unreadable) + len(self.missing)

    def to_json(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "bytes": self.bytes,
            "bad": self.bad,
            "corrupt": [d.hex for d in self.corrupt],
            "unreadable": [d.hex for d in self.unreadable],
            "missing": [d.hex for d in self.missing],
        }


class _Throttle:
    """At most ``rate`` bytes a second on average (None: no limit)."""

    def __init__(
        self,
        rate: int | None,
        check: Callable[[], None],
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self._rate, self._check, self._clock, self._sleep = rate, check, clock, sleep
        self._start = clock()
        self._done = 0

    def account(self, nbytes: int) -> None:
        self._done += nbytes
        if not self._rate:
            return
        while (ahead := self._done / self._rate - (self._clock() - self._start)) > 0:
            self._check()
            self._sleep(min(ahead, _PAUSE))


def _hash_fd(fd: int, throttle: _Throttle) -> Digest:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read the disk, not the page cache
    h = Hasher()
    while chunk := os.read(fd, _READ):
        h.update(chunk)
        throttle.account(len(chunk))
    return h.digest()


def scrub(
    cache: BlobCache,
    *,
    rate: int | None = None,
    check: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_blob: Callable[[int], None] = lambda nbytes: None,
) -> Scrubbed:
    """Rehash every blob the index names at most ``rate`` bytes a second; drop the bad.
    ``on_blob(nbytes)`` is called after each blob hashed with the bytes hashed so far."""
    throttle = _Throttle(rate, check, clock, sleep)
    checked = nbytes = 0
    corrupt: list[Digest] = []
    unreadable: list[Digest] = []
    missing: list[Digest] = []
    for digest, _ in cache.index.items():
        check()
        try:
            fd = os.open(cache.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if cache.drop(digest):  # still indexed: not evicted meanwhile
                missing.append(digest)
            continue
        try:  # the file stays open: its inode number cannot name another file meanwhile
            seen = os.fstat(fd)
            try:
                good = _hash_fd(fd, throttle) == digest
            except OSError:  # EIO: Btrfs found a data checksum that does not match
                if cache.drop(digest, unless_replaced=seen):
                    unreadable.append(digest)
                continue
            checked += 1
            nbytes += seen.st_size
            on_blob(nbytes)
            if not good and cache.drop(digest, unless_replaced=seen):
                corrupt.append(digest)
        finally:
            os.close(fd)
    return Scrubbed(checked, nbytes, corrupt, unreadable, missing)
