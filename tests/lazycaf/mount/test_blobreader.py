"""``BlobReader`` without FUSE: a real host cache (blob files and the LMDB index) and a
scripted daemon client that stores blobs when asked, fails, hangs or dies.

What it promises: bytes of cached blobs straight from their files; missing chunks fetched
(all of a read's at once) and then read; a fetch bounded by the timeout; a daemon that went
away restarted once and asked again; its observer told of each miss and read; failed
fetches of several chunks raised as one project error naming a blob (never an exception
group); a blob whose length is not what the manifest implies refused as an integrity error.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from fetcher.cache.blobcache import BlobCache
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, IntegrityError, LazyCafError, NotFound, Unavailable
from lazycaf.core.manifest import FILE, Entry
from lazycaf.host.client import DaemonUnreachable
from lazycaf.host.index import Index
from lazycaf.mount.blobreader import BlobReader

CHUNK = 64 << 10
DATA = random.Random(7).randbytes(3 * CHUNK) + b"tail"  # three whole chunks and a bit
CHUNKS = [DATA[i : i + CHUNK] for i in range(0, len(DATA), CHUNK)]
ENTRY = Entry(
    "lib/big.so",
    FILE,
    0o644,
    0,
    len(DATA),
    Digest.of(DATA),
    tuple(Digest.of(c) for c in CHUNKS),
)
SMALL = b"print('hello')\n"
SMALL_ENTRY = Entry("hello.py", FILE, 0o644, 0, len(SMALL), Digest.of(SMALL))
BLOBS = {Digest.of(b): b for b in [*CHUNKS, SMALL]}


class Daemon:
    """The daemon client a mount holds, scripted: ``ensure`` stores the blob in the cache
    (after ``delay``), unless the blob ``hangs`` or the daemon is ``gone``."""

    def __init__(self, cache: BlobCache) -> None:
        self.cache = cache
        self.asked: list[Digest] = []
        self.delay = 0.0
        self.hangs: set[Digest] = set()
        self.fails: dict[Digest, Exception] = {}
        self.gone = False
        self.in_flight = 0
        self.most_in_flight = 0

    async def ensure(self, digest: Digest) -> int:
        if self.gone:
            raise DaemonUnreachable("fetcher daemon", "connection refused")
        self.asked.append(digest)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if digest in self.hangs:
                await trio.sleep_forever()
            await trio.sleep(self.delay)
            if digest in self.fails:
                raise self.fails[digest]
            return self.cache.commit(digest, *framing.encode(BLOBS[digest]))
        finally:
            self.in_flight -= 1

    async def touch(self, digests: list[Digest]) -> None:
        pass

    async def drop_idle(self) -> None:
        pass


class Observer:
    def __init__(self) -> None:
        self.misses: list[str] = []
        self.reads: list[tuple[str, int, bool]] = []

    def missed(self, entry: Entry) -> None:
        self.misses.append(entry.path)

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
        self.reads.append((entry.path, nbytes, fetched))


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    c = BlobCache(tmp_path / "cache")
    yield c
    c.close()


def reader(
    cache: BlobCache, daemon: Daemon, observer: object = None, **kw: object
) -> tuple[BlobReader, Index]:
    """A reader over the cache's own index (LMDB opens an environment once per process; a
    mount opens it read-only in its own)."""
    return (
        BlobReader(
            cache.layout,
            cache.index,
            daemon,  # type: ignore[arg-type]
            chunk_size=CHUNK,
            observer=observer,  # type: ignore[arg-type]
            **kw,  # type: ignore[arg-type]
        ),
        cache.index,
    )


async def test_cached_blobs_are_read_without_the_daemon(cache: BlobCache) -> None:
    for b in BLOBS.values():
        cache.commit(Digest.of(b), *framing.encode(b))
    daemon = Daemon(cache)
    r, _ = reader(cache, daemon)
    try:
        assert await r.read(2, ENTRY, 0, len(DATA)) == DATA
        assert await r.read(2, ENTRY, CHUNK - 10, 20) == DATA[CHUNK - 10 : CHUNK + 10]
        assert await r.read(2, ENTRY, len(DATA) - 2, 100) == b"il"  # short at the end
        assert await r.read(3, SMALL_ENTRY, 6, 5) == b"'hell"
        assert daemon.asked == []
    finally:
        r.close()


async def test_a_read_across_missing_chunks_fetches_them_together(cache: BlobCache) -> None:
    daemon = Daemon(cache)
    daemon.delay = 0.05
    observer = Observer()
    r, _ = reader(cache, daemon, observer)
    try:
        got = await r.read(2, ENTRY, CHUNK - 100, 2 * CHUNK)  # spans chunks 0, 1 and 2
        assert got == DATA[CHUNK - 100 : 3 * CHUNK - 100]
        assert sorted(daemon.asked) == sorted(ENTRY.chunks[:3])
        assert daemon.most_in_flight == 3  # concurrently, not one after another
        assert observer.misses == ["lib/big.so"]
        assert observer.reads == [("lib/big.so", 2 * CHUNK, True)]
        assert await r.read(2, ENTRY, 0, 10) == DATA[:10]  # now cached: no fetch
        assert len(daemon.asked) == 3
        assert observer.reads[-1] == ("lib/big.so", 10, False)
    finally:
        r.close()


async def test_a_blob_that_does_not_arrive_fails_the_read_in_time(
    cache: BlobCache, autojump_clock: trio.abc.Clock
) -> None:
    daemon = Daemon(cache)
    daemon.hangs.add(SMALL_ENTRY.digest)  # type: ignore[arg-type]
    r, _ = reader(cache, daemon, timeout=7.0)
    try:
        start = trio.current_time()
        with pytest.raises(Unavailable, match="not fetched within 7 s"):
            await r.read(3, SMALL_ENTRY, 0, 100)
        assert trio.current_time() - start == pytest.approx(7.0)
    finally:
        r.close()


async def test_a_daemon_that_went_away_is_restarted_and_asked_again(cache: BlobCache) -> None:
    daemon = Daemon(cache)
    daemon.gone = True
    restarts: list[int] = []

    def restart() -> None:  # the mount's ensure_daemon: here the daemon comes back
        restarts.append(1)
        daemon.gone = False

    r, _ = reader(cache, daemon, restart_daemon=restart)
    try:
        assert await r.read(3, SMALL_ENTRY, 0, 100) == SMALL
        assert restarts == [1]
        assert daemon.asked == [SMALL_ENTRY.digest]
    finally:
        r.close()


async def test_without_a_way_to_restart_a_gone_daemon_fails_the_read(cache: BlobCache) -> None:
    daemon = Daemon(cache)
    daemon.gone = True
    r, _ = reader(cache, daemon)
    try:
        with pytest.raises(DaemonUnreachable):
            await r.read(3, SMALL_ENTRY, 0, 100)
    finally:
        r.close()


async def test_a_blob_evicted_after_its_index_record_was_read_is_fetched_again(
    cache: BlobCache,
) -> None:
    cache.commit(SMALL_ENTRY.digest, *framing.encode(SMALL))  # type: ignore[arg-type]
    daemon = Daemon(cache)
    r, _ = reader(cache, daemon)
    try:
        cache.path(SMALL_ENTRY.digest).unlink()  # type: ignore[arg-type]
        assert await r.read(3, SMALL_ENTRY, 0, 100) == SMALL
        assert daemon.asked == [SMALL_ENTRY.digest]
    finally:
        r.close()


@pytest.mark.parametrize("how", ["not found", "daemon error", "one hangs"])
async def test_a_read_across_chunks_that_cannot_be_fetched_fails_with_one_error(
    cache: BlobCache, how: str, autojump_clock: trio.abc.Clock
) -> None:
    """Defect 1 of issue 13: two missing chunks used to fail the read with an exception
    group, which the FUSE handler did not catch, and the mount died."""
    daemon = Daemon(cache)
    first, second = ENTRY.chunks[0], ENTRY.chunks[1]
    if how == "not found":
        daemon.fails = {d: BlobNotFound(d, "the CAS") for d in (first, second)}
    elif how == "daemon error":
        daemon.fails = {d: ConnectionResetError("daemon died") for d in (first, second)}
    else:  # the first fails at once, the second would hang: no wait for it
        daemon.fails = {first: BlobNotFound(first, "the CAS")}
        daemon.hangs.add(second)
    r, _ = reader(cache, daemon, timeout=30.0)
    try:
        start = trio.current_time()
        with pytest.raises(LazyCafError) as info:
            await r.read(2, ENTRY, CHUNK - 4096, 8192)  # across the first chunk boundary
        assert not isinstance(info.value, BaseExceptionGroup)
        assert str(first) in str(info.value) or str(second) in str(info.value)
        if how == "daemon error":
            assert isinstance(info.value, Unavailable) and "daemon died" in str(info.value)
        else:
            assert isinstance(info.value, NotFound)
        assert trio.current_time() - start < 30.0  # the failure cancelled the hanging fetch
        assert sorted(daemon.asked) == sorted([first, second])
        # the reader is still usable: another file reads fine
        assert await r.read(3, SMALL_ENTRY, 0, 100) == SMALL
    finally:
        r.close()


@pytest.mark.parametrize("declared", [len(SMALL) - 1, len(SMALL) + 1, 1])
async def test_a_blob_whose_length_disagrees_with_the_manifest_is_an_integrity_error(
    cache: BlobCache, declared: int
) -> None:
    """Defect 5 of issue 13: the read used to truncate to the manifest's size (or read
    short); a size that disagrees with the blob is refused, cached or fetched."""
    lying = SMALL_ENTRY._replace(size=declared)
    daemon = Daemon(cache)
    r, _ = reader(cache, daemon)
    try:
        with pytest.raises(IntegrityError, match=f"blob {SMALL_ENTRY.digest} has {len(SMALL)} "):
            await r.read(3, lying, 0, 4096)  # fetched, then refused
        assert daemon.asked == [SMALL_ENTRY.digest]
        with pytest.raises(IntegrityError):
            await r.read(3, lying, 0, 4096)  # cached: refused without a fetch
        assert daemon.asked == [SMALL_ENTRY.digest]
        assert await r.read(3, SMALL_ENTRY, 0, 4096) == SMALL  # the honest entry still reads
    finally:
        r.close()


async def test_a_chunk_of_the_wrong_length_is_an_integrity_error(cache: BlobCache) -> None:
    """A chunked file whose declared size makes its last chunk shorter than the blob."""
    for b in BLOBS.values():
        cache.commit(Digest.of(b), *framing.encode(b))
    lying = ENTRY._replace(size=ENTRY.size - 1)  # same chunk count, last chunk 3 bytes
    daemon = Daemon(cache)
    r, _ = reader(cache, daemon)
    try:
        assert await r.read(2, lying, 0, CHUNK) == DATA[:CHUNK]  # whole chunks are right
        with pytest.raises(IntegrityError, match=f"blob {ENTRY.chunks[-1]} has 4 bytes"):
            await r.read(2, lying, 3 * CHUNK, 10)
        assert daemon.asked == []
    finally:
        r.close()


async def test_a_file_read_in_order_has_the_next_blobs_read_ahead(
    cache: BlobCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a chunked file in order asks the kernel for the blobs ahead (the kernel sends
    128 KiB reads: each would otherwise wait for the disk in turn); out of order, nothing."""
    import lazycaf.mount.blobreader as blobreader

    for b in BLOBS.values():
        cache.commit(Digest.of(b), *framing.encode(b))
    advised: list[int] = []
    real = blobreader.os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append(os.fstat(fd).st_size)  # which blob, by its length
        real(fd, offset, length, advice)

    monkeypatch.setattr(blobreader.os, "posix_fadvise", fadvise)
    monkeypatch.setattr(blobreader, "_AHEAD", 3)
    r, _ = reader(cache, Daemon(cache))
    try:
        half = CHUNK // 2
        assert await r.read(2, ENTRY, 0, half) == DATA[:half]  # first read: not in order yet
        assert advised == []
        assert await r.read(2, ENTRY, half, half) == DATA[half:CHUNK]  # mid-blob: nothing new
        assert advised == []
        assert await r.read(2, ENTRY, CHUNK, half) == DATA[CHUNK : CHUNK + half]
        assert advised == [4]  # entering blob 1: the window's far end, the 4-byte tail blob
        assert await r.read(2, ENTRY, 0, 10) == DATA[:10]  # out of order
        assert advised == [4]
    finally:
        r.close()
