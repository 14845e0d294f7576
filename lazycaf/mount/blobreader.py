"""Reading a file's bytes in a mount: cached blob files first, the daemon on a miss.

The fast path is a read-only LMDB lookup and a ``preadv(RWF_NOWAIT)`` of the cache file on
the FUSE thread: page-cache hits are faster there than through a worker thread (see
MEASUREMENTS.md), and RWF_NOWAIT makes the kernel refuse instead of blocking when the pages
are not cached, so cold disk reads go to worker threads and overlap rather than stall every
other request. A miss asks the daemon to fetch the blob, bounded by ``timeout``; the chunks
a read needs are fetched concurrently, and a read fails with one ``LazyCafError`` (never an
exception group). A blob file whose length is not what the manifest's size implies for it
is refused (``IntegrityError``): the size is part of what the manifest's digest promises.

The daemon never sees reads of cached blobs, so their LRU position would be their fetch
time: the reader collects the blobs it opens and ``report_touches`` sends them to the
daemon in one ``touch`` request at most once a second. GC may delete a blob between its
fetch and its open, or while an old descriptor reads it (that keeps working); an open that
misses fetches again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Protocol

import trio

from lazycaf.core.chunking import chunks_touched
from lazycaf.core.digest import Digest
from lazycaf.core.errors import (
    AccessDenied,
    IntegrityError,
    LazyCafError,
    NotFound,
    Unavailable,
    UsageError,
)
from lazycaf.core.manifest import Entry
from lazycaf.disk.readahead import will_need
from lazycaf.host.client import DaemonUnreachable, FetcherClient
from lazycaf.host.defaults import FETCH_TIMEOUT
from lazycaf.host.index import Index
from lazycaf.host.paths import CacheLayout

__all__ = ["BlobReader", "ReadObserver"]

log = logging.getLogger(__name__)
_MAX_FDS: Final = 512
_AHEAD: Final = 4  # blobs read ahead of a cold read of a file read in order (4 MiB)


class ReadObserver(Protocol):
    """What a mount learns from its reads (``lazycaf.mount.recording.MountProfile``)."""

    def missed(self, entry: Entry) -> None:
        """A read of ``entry`` is about to wait for a fetch."""

    def read(
        self,
        inode: int,
        entry: Entry,
        blobs: list[Digest],
        chunks: range,
        nbytes: int,
        *,
        fetched: bool,
        wait: float,
    ) -> None:
        """A read returned ``nbytes`` of ``entry`` from ``blobs`` (the ``chunks`` it
        touched); ``fetched``: some had to be fetched, which took ``wait`` seconds."""


class BlobReader:
    """Reads byte ranges of manifest files from the host cache, fetching missing blobs.

    ``observer`` hears of every miss and read (traces, prefetch); ``restart_daemon`` starts
    a new daemon when the one asked has gone (None: the read fails instead).
    """

    def __init__(
        self,
        cache: CacheLayout,
        index: Index,
        client: FetcherClient,
        *,
        chunk_size: int,
        timeout: float = FETCH_TIMEOUT,
        observer: ReadObserver | None = None,
        restart_daemon: Callable[[], None] | None = None,
    ) -> None:
        self._cache = cache
        self._index = index
        self._client = client
        self._chunk_size = chunk_size
        self._timeout = timeout
        self._observer = observer
        self._restart_daemon = restart_daemon
        self._fds: OrderedDict[Digest, tuple[int, int]] = OrderedDict()  # -> (fd, size)
        self._disk = trio.CapacityLimiter(8)
        self._opened: set[Digest] = set()  # since the last touch report
        self._busy: dict[int, int] = {}  # fd -> reads in worker threads using it
        self._retired: list[int] = []  # fds to close once no thread uses them
        self._ends: dict[int, int] = {}  # inode -> where its last read ended

    def close(self) -> None:
        for fd in [*(fd for fd, _ in self._fds.values()), *self._retired]:
            os.close(fd)
        self._fds.clear()
        self._retired.clear()

    def _retire(self, fd: int) -> None:
        if self._busy.get(fd):
            self._retired.append(fd)
        else:
            os.close(fd)

    def drop_evicted(self) -> int:
        """Close descriptors of blobs GC evicted, so their disk space is freed (an open
        descriptor keeps a deleted file's extents); returns how many."""
        retired, self._retired = self._retired, []
        for fd in retired:
            self._retire(fd)
        gone = [d for d in self._fds if d not in self._index]
        for d in gone:
            self._retire(self._fds.pop(d)[0])
        return len(gone)

    def _open_cached(self, digest: Digest, length: int) -> int | None:
        """A descriptor of the cached blob ``digest``, None when it is not cached.

        ``length`` is the blob's size as the manifest implies it. A blob of another length
        is an ``IntegrityError``: the size is part of what the manifest's digest promises,
        and reading short or long would serve bytes the manifest does not describe. The
        file's size is taken once per descriptor (one fstat per open)."""
        held = self._fds.get(digest)
        if held is None:
            if digest not in self._index:
                return None
            try:
                fd = os.open(self._cache.blob_str(digest), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None  # evicted since the index said so: fetch again
            held = fd, os.fstat(fd).st_size
            self._fds[digest] = held
            self._opened.add(digest)
            if len(self._fds) > _MAX_FDS:
                _, (old, _) = self._fds.popitem(last=False)
                self._retire(old)
        else:
            self._fds.move_to_end(digest)
        fd, size = held
        if size != length:
            raise IntegrityError(
                f"blob {digest} has {size} bytes, the manifest says {length}: not served"
            )
        return fd

    async def _fetch(self, digest: Digest) -> None:
        with trio.move_on_after(self._timeout) as scope:
            try:
                await self._client.ensure(digest)
            except DaemonUnreachable:
                if self._restart_daemon is None:
                    raise
                # the daemon died (or was stopped): start a new one, which reconciles the
                # cache first, and ask again
                log.warning("fetcher daemon gone while fetching %s: restarting it", digest)
                await self._client.drop_idle()
                await trio.to_thread.run_sync(self._restart_daemon)
                await self._client.ensure(digest)
        if scope.cancelled_caught:
            raise Unavailable(f"blob {digest} not fetched within {self._timeout:g} s")

    async def report_touches(self, *, interval: float = 1.0) -> None:
        """Send the blobs opened since the last report, once per ``interval``, forever."""
        while True:
            await trio.sleep(interval)
            self.drop_evicted()
            if not self._opened:
                continue
            opened, self._opened = list(self._opened), set()
            try:
                await self._client.touch(opened)
            except LazyCafError as exc:  # only LRU order suffers
                log.info("could not report %d blob reads: %s", len(opened), exc)

    async def read(self, inode: int, entry: Entry, offset: int, size: int) -> bytes | bytearray:
        """Bytes ``[offset, offset + size)`` of a file entry (short at end of file)."""
        blobs = entry.blob_digests()
        cs = self._chunk_size
        touched = chunks_touched(offset, size, entry.size, cs)
        # the length of each touched blob (not of all of them: a 400 MB library has 400)
        lengths = {i: min(cs, entry.size - i * cs) if entry.chunks else entry.size for i in touched}
        needed = [blobs[i] for i in touched]
        missing = [blobs[i] for i in touched if self._open_cached(blobs[i], lengths[i]) is None]
        wait = 0.0
        if missing:
            start = time.monotonic()
            if self._observer is not None:
                self._observer.missed(entry)
            if len(missing) == 1:
                await self._fetch(missing[0])
            else:
                await self._fetch_all(list(dict.fromkeys(missing)))
            wait = time.monotonic() - start
        # in order: this read starts where the last one asked for ended (the kernel sends a
        # file's readahead as several reads at once, so not where the last one finished)
        sequential = self._ends.get(inode) == offset
        if len(self._ends) > _MAX_FDS:
            self._ends.clear()
        self._ends[inode] = offset + size
        data = await self._assemble(entry, blobs, lengths, touched, offset, size, sequential)
        if self._observer is not None:
            self._observer.read(
                inode, entry, needed, touched, len(data), fetched=bool(missing), wait=wait
            )
        return data

    async def _fetch_all(self, digests: list[Digest]) -> None:
        """Fetch ``digests`` concurrently. The first failure cancels the others (the read
        fails anyway) and is raised as one ``LazyCafError`` naming its blob, never as an
        exception group: a group would escape the FUSE handler's error mapping."""
        failures: list[tuple[Digest, Exception]] = []

        async def fetch(digest: Digest, cancel: trio.CancelScope) -> None:
            try:
                await self._fetch(digest)
            except Exception as exc:
                failures.append((digest, exc))
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            for d in digests:
                nursery.start_soon(fetch, d, nursery.cancel_scope)
        if failures:
            raise _one_error(failures[0][0], failures[0][1], len(digests))

    async def _assemble(
        self,
        entry: Entry,
        blobs: tuple[Digest, ...],
        lengths: dict[int, int],
        touched: range,
        offset: int,
        size: int,
        sequential: bool = False,
    ) -> bytes | bytearray:
        """The bytes of the touched blobs. A read that has to go to the disk asks the kernel
        to read the rest of its blob too and, when this file is read in order, the next
        ``_AHEAD`` blobs (``POSIX_FADV_WILLNEED``): the kernel sends a chunked file's reads
        in 128 KiB requests, so without it each request of a cold chunk waits for the disk
        in turn, with a thread hop each."""
        end = min(offset + size, entry.size)
        parts = []
        for i in touched:
            fd = self._open_cached(blobs[i], lengths[i])
            if fd is None:  # evicted between its fetch and now: once more
                await self._fetch(blobs[i])
                fd = self._open_cached(blobs[i], lengths[i])
            if fd is None:
                raise Unavailable(f"blob {blobs[i]} vanished from the cache after its fetch")
            base = i * self._chunk_size if entry.chunks else 0
            lo = max(offset, base)
            hi = min(end, base + self._chunk_size) if entry.chunks else end
            ahead = self._ahead(entry, blobs, lengths, i, sequential) if entry.chunks else ()
            parts.append(await self._pread(fd, hi - lo, lo - base, ahead))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _ahead(
        self,
        entry: Entry,
        blobs: tuple[Digest, ...],
        lengths: dict[int, int],
        i: int,
        sequential: bool,
    ) -> tuple[int, ...]:
        """Descriptors of the cached blobs after blob ``i`` of a file read in order."""
        if not sequential:
            return ()
        cs = self._chunk_size
        out = []
        for j in range(i + 1, min(i + 1 + _AHEAD, len(blobs))):
            length = lengths.get(j, min(cs, entry.size - j * cs))
            try:
                fd = self._open_cached(blobs[j], length)
            except IntegrityError:  # the read that needs it will say so
                break
            if fd is None:
                break
            out.append(fd)
        return tuple(out)

    async def _pread(
        self, fd: int, length: int, offset: int, ahead: tuple[int, ...] = ()
    ) -> bytes | bytearray:
        buf = bytearray(length)
        try:
            got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            got = 0
        if got == length or length == 0:
            if ahead and offset == 0:  # a file read in order enters this blob: keep the
                will_need(ahead[-1])  # window ``_AHEAD`` blobs ahead
            return buf
        fds = (fd, *ahead)
        for f in fds:
            self._busy[f] = self._busy.get(f, 0) + 1
        try:
            rest = await trio.to_thread.run_sync(
                _read_cold, fd, length - got, offset + got, ahead, limiter=self._disk
            )
        finally:
            for f in fds:
                if self._busy[f] == 1:
                    del self._busy[f]
                else:
                    self._busy[f] -= 1
        return buf[:got] + rest


def _read_cold(fd: int, length: int, offset: int, ahead: tuple[int, ...]) -> bytes:
    """A read the page cache could not answer (a worker thread): the kernel is asked for the
    rest of this blob and the blobs ``ahead`` first, then the read waits for its bytes."""
    for f, start in ((fd, offset + length), *((a, 0) for a in ahead)):
        will_need(f, start)
    return os.pread(fd, length, offset)


def _one_error(digest: Digest, exc: Exception, asked: int) -> LazyCafError:
    """The failed fetch of ``digest`` (one of ``asked`` a read needed) as one error of the
    same kind (so the same exit code and errno), naming the blob."""
    if isinstance(exc, LazyCafError) and str(digest) in str(exc):
        return exc
    kinds: tuple[type[LazyCafError], ...] = (
        NotFound,
        IntegrityError,
        Unavailable,
        AccessDenied,
        UsageError,
    )
    kind = next((k for k in kinds if isinstance(exc, k)), Unavailable)
    error = kind(f"blob {digest} (one of {asked} a read needs) not fetched: {exc}")
    error.__cause__ = exc
    return error
