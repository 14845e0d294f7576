"""``BlobReader`` without FUSE: a real host cache (blob files and the LMDB index) and a
scripted daemon client that stores blobs when asked, fails, hangs or dies.

What it promises: bytes of cached blobs straight from their files; missing chunks fetched
(all of a read's at once) and then read; a fetch bounded by the timeout; a daemon that went
away restarted once and asked again; its observer told of each miss and read.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from fetcher.cache.blobcache import BlobCache
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import Unavailable
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
