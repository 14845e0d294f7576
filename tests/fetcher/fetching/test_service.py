"""FetchService with a scripted source: a read never waits behind queued prefetch groups,
and a source that blows up fails its fetches without taking the service down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fetcher.cache.blobcache import BlobCache
from fetcher.fetching.service import DEMAND, PREFETCH, FetchService
from fetcher.fetching.sources import Fetched
from lazycaf.core.digest import Digest
from lazycaf.core.errors import Unavailable

BLOBS = {Digest.of(bytes([i]) * 1000): bytes([i]) * 1000 for i in range(8)}
D = list(BLOBS)


class ScriptedSource:
    """Every group request takes ``delay`` seconds; ``boom`` raises a non-LazyCAF error."""

    cas: Any = None
    peers = None

    def __init__(self, delay: float = 0.0, boom: bool = False) -> None:
        self.delay = delay
        self.boom = boom
        self.single: list[Digest] = []
        self.groups: list[list[Digest]] = []

    def first_peer(self, digest: Digest) -> str | None:
        return None

    async def get(self, digest: Digest, priority: str, *, direct: bool = False) -> Fetched:
        self.single.append(digest)
        if self.boom:
            raise RuntimeError("a bug in a source")
        return Fetched("identity", BLOBS[digest], "cas")

    async def get_many(
        self, digests: list[Digest], priority: str, *, direct: bool = False
    ) -> tuple[dict[Digest, Fetched], None]:
        self.groups.append(list(digests))
        await trio.sleep(self.delay)
        if self.boom:
            raise ExceptionGroup("peers", [ValueError("malformed answer")])
        return {d: Fetched("identity", BLOBS[d], "cas") for d in digests}, None


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    c = BlobCache(tmp_path / "cache")
    yield c
    c.close()


async def test_a_read_takes_over_a_prefetch_group_still_waiting_for_a_slot(
    cache: BlobCache,
) -> None:
    source = ScriptedSource(delay=2.0)
    service = FetchService(cache, source, prefetch_concurrency=1)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        async with trio.open_nursery() as prefetchers:
            prefetchers.start_soon(service.fetch_many, D[:4])  # takes the only prefetch slot
            await trio.testing.wait_all_tasks_blocked()
            prefetchers.start_soon(service.fetch_many, D[4:])  # queued behind it
            await trio.testing.wait_all_tasks_blocked()
            assert await service.ensure(D[6], priority=DEMAND) == 1000
            # answered while the group ahead still waits on its source, not after both
            assert source.groups == [D[:4]] and not service.is_cached(D[0])
            assert source.single == [D[6]]
        assert all(service.is_cached(d) for d in D)
        assert source.groups == [D[:4], [D[4], D[5], D[7]]]  # the group skipped D[6]
        nursery.cancel_scope.cancel()


async def test_a_failing_source_fails_the_fetch_not_the_service(cache: BlobCache) -> None:
    source = ScriptedSource(boom=True)
    service = FetchService(cache, source)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        with pytest.raises(Unavailable, match="a bug in a source"):
            await service.ensure(D[0])
        await service.fetch_many(D[1:3], priority=PREFETCH)  # logged, not raised
        assert not service.is_cached(D[1])
        source.boom = False
        assert await service.ensure(D[1]) == 1000  # the service still works
        nursery.cancel_scope.cancel()
