"""FetchService with a scripted source: a read never waits behind queued prefetch groups,
and a source that blows up fails its fetches without taking the service down."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from fetcher.cache.blobcache import BlobCache
from fetcher.fetching.service import FetchService
from fetcher.fetching.source import Arrived, Fetched, Outcome
from lazycaf.core.digest import Digest
from lazycaf.core.errors import Unavailable
from lazycaf.core.priority import Priority

BLOBS = {Digest.of(bytes([i]) * 1000): bytes([i]) * 1000 for i in range(8)}
D = list(BLOBS)


class ScriptedSource:
    """A ``BlobSource`` standing in for the tiered one (no peers: it is its own CAS). Group
    requests wait for ``gate`` when there is one; ``boom`` raises a non-LazyCAF error."""

    where = "scripted"
    peers = None

    def __init__(self, gate: trio.Event | None = None, boom: bool = False) -> None:
        self.gate = gate
        self.boom = boom
        self.single: list[Digest] = []
        self.groups: list[list[Digest]] = []

    @property
    def cas(self) -> ScriptedSource:
        return self

    def first_peer(self, digest: Digest) -> str | None:
        return None

    async def aclose(self) -> None:
        pass

    async def fetch(self, digest: Digest, priority: Priority) -> Fetched:
        self.single.append(digest)
        if self.boom:
            raise RuntimeError("a bug in a source")
        return Fetched("identity", BLOBS[digest], "cas")

    async def fetch_many(
        self, digests: list[Digest], priority: Priority, *, arrived: Arrived | None = None
    ) -> Outcome:
        """With ``arrived`` (a streaming CAS): each blob handed over on its own."""
        self.groups.append(list(digests))
        if self.gate is not None:
            await self.gate.wait()
        if self.boom:
            raise ExceptionGroup("peers", [ValueError("malformed answer")])
        got = {d: Fetched("identity", BLOBS[d], "cas") for d in digests}
        if arrived is None:
            return got, None
        for d, fetched in got.items():
            await arrived({d: fetched})
        return {}, None


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    c = BlobCache(tmp_path / "cache")
    yield c
    c.close()


async def test_a_read_takes_over_a_prefetch_group_still_waiting_for_a_slot(
    cache: BlobCache,
) -> None:
    gate = trio.Event()
    source = ScriptedSource(gate)
    service = FetchService(cache, source, prefetch_concurrency=1)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        async with trio.open_nursery() as prefetchers:
            prefetchers.start_soon(service.fetch_many, D[:4])  # takes the only prefetch slot
            await trio.testing.wait_all_tasks_blocked()
            prefetchers.start_soon(service.fetch_many, D[4:])  # queued behind it
            await trio.testing.wait_all_tasks_blocked()
            assert await service.ensure(D[6], priority=Priority.DEMAND) == 1000
            # answered while the group ahead still waits on its source, not after both
            assert source.groups == [D[:4]] and not service.is_cached(D[0])
            assert source.single == [D[6]]
            gate.set()
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
        await service.fetch_many(D[1:3], priority=Priority.PREFETCH)  # logged, not raised
        assert not service.is_cached(D[1])
        source.boom = False
        assert await service.ensure(D[1]) == 1000  # the service still works
        nursery.cancel_scope.cancel()


async def test_a_group_stores_its_good_blobs_when_one_does_not_verify(cache: BlobCache) -> None:
    class Corrupting(ScriptedSource):
        async def fetch_many(
            self, digests: list[Digest], priority: Priority, *, arrived: Arrived | None = None
        ) -> Outcome:
            got, err = await super().fetch_many(digests, priority)
            got[D[1]] = Fetched("identity", b"not the blob", "cas")
            return got, err

    service = FetchService(cache, Corrupting())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await service.fetch_many(D[:5], priority=Priority.PREFETCH)
        assert [service.is_cached(d) for d in D[:5]] == [True, False, True, True, True]
        stats = service.statistics()
        assert (stats.prefetched, stats.fetch_failures, stats.failures_integrity) == (4, 1, 1)
        assert os.listdir(cache.layout.tmp) == []
        nursery.cancel_scope.cancel()
