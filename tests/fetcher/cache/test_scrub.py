"""The cache scrub (``fetcher.cache.scrub``) on a cache directory of the test's own: what it
finds and drops, the rate limit (virtual time), and races with GC and new fetches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fetcher.cache.blobcache import BlobCache
from fetcher.cache.scrub import scrub
from lazycaf.core.digest import Digest


class Cancelled(Exception):
    pass


def _cache(tmp_path: Path, n: int = 5, size: int = 3000) -> tuple[BlobCache, list[Digest]]:
    cache = BlobCache(tmp_path / "cache")
    digests = []
    for i in range(n):
        data = bytes([i]) * (size + i)
        digests.append(Digest.of(data))
        cache.commit(digests[-1], "identity", data)
    return cache, digests


def _rewrite(path: Path, data: bytes) -> None:
    path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(0o444)


def test_a_sound_cache_verifies_whole(tmp_path: Path) -> None:
    cache, digests = _cache(tmp_path)
    done = scrub(cache)
    assert (done.checked, done.bad, done.bytes) == (5, 0, sum(3000 + i for i in range(5)))
    assert all(cache.has(d) for d in digests)
    cache.close()


def test_corrupt_and_missing_blobs_are_dropped_from_disk_and_index(tmp_path: Path) -> None:
    cache, digests = _cache(tmp_path)
    usage = cache.usage
    rotten, gone = digests[1], digests[3]
    _rewrite(cache.path(rotten), b"\x00" * (3000 + 1))  # same size, other bytes
    cache.path(gone).unlink()
    done = scrub(cache)
    assert done.corrupt == [rotten] and done.missing == [gone] and done.bad == 2
    assert done.checked == 4  # the missing one could not be read
    assert done.to_json()["corrupt"] == [rotten.hex]
    assert not cache.path(rotten).exists()
    assert rotten not in cache.index and gone not in cache.index
    assert cache.usage == usage - (3000 + 1) - (3000 + 3) == cache.index.total_bytes()
    assert scrub(cache).bad == 0  # nothing left to find
    cache.close()


def test_the_rate_bounds_bytes_per_second(tmp_path: Path) -> None:
    cache, _ = _cache(tmp_path, n=4, size=2500)  # ~10 kB
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    done = scrub(cache, rate=1000, clock=lambda: now[0], sleep=sleep)
    assert done.checked == 4
    assert sum(slept) == pytest.approx(done.bytes / 1000, abs=0.01)  # virtual seconds
    assert max(slept) <= 0.1  # short sleeps: a cancelled request stops between them
    slept.clear()
    scrub(cache, clock=lambda: now[0], sleep=sleep)  # no rate: no sleep
    assert slept == []
    cache.close()


def test_a_cancelled_scrub_stops_between_reads(tmp_path: Path) -> None:
    cache, _ = _cache(tmp_path)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        scrub(cache, check=check)
    assert len(calls) == 3
    cache.close()


def test_drop_spares_a_blob_evicted_or_fetched_again_meanwhile(tmp_path: Path) -> None:
    cache, digests = _cache(tmp_path)
    d = digests[0]
    with open(cache.path(d), "rb") as hashed:  # the scrub holds the file it hashed open
        seen = os.fstat(hashed.fileno())
        # GC evicted it and a read fetched it again: a new file, verified on its way in
        cache.evict([d])
        cache.commit(d, "identity", bytes([0]) * 3000)
        assert not cache.drop(d, unless_replaced=seen)
    assert cache.has(d)
    cache.evict([d])
    assert not cache.drop(d)  # not indexed any more: nothing to drop
    assert cache.drop(digests[1], unless_replaced=os.stat(cache.path(digests[1])))
    assert not cache.has(digests[1])
    cache.close()
