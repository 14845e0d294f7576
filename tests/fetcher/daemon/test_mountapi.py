"""The daemon's socket API for mounts, served in-process on a real Unix socket and driven by
the very client a mount uses (``FetcherClient``), over a fetch service with a local CAS.

Each request of the protocol: its reply, its typed error (the error kind crosses the socket
and is raised again on the mount's side), and a connection that goes on after an error.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from fetcher.cache.blobcache import BlobCache
from fetcher.daemon.mountapi import MountApi
from fetcher.fetching import service as service_module
from fetcher.fetching.prefetch import PrefetchQueue
from fetcher.fetching.service import FetchService
from fetcher.fetching.sources import CasSource, TieredSource
from lazycaf.cas.batch import pack_batch
from lazycaf.cas.bundlepart import pack_part
from lazycaf.cas.casdir import CasDir
from lazycaf.cas.local import LocalCAS
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, NotFound, UsageError
from lazycaf.core.manifest import DIR, FILE, Entry, Manifest
from lazycaf.core.priority import Priority
from lazycaf.host import client as client_module
from lazycaf.host.client import FetcherClient
from lazycaf.mount.recording import prefetch_own_bundle
from lazycaf.traces.profiles import load_profile
from lazycaf.traces.trace import AccessRecord, Trace
from tests.helpers import wait_for_async

BLOBS = [f"module {i}\n".encode() * 50 for i in range(6)]
DIGESTS = [Digest.of(b) for b in BLOBS]


@dataclass
class Daemon:
    client: FetcherClient
    cache: BlobCache
    store: CasDir
    manifest: Digest
    cas: LocalCAS


class _GatedCAS(LocalCAS):
    """A local CAS that notes what it is asked for and holds back a blob (a bundle part)
    whose gate is shut: a part on its way, as long as the test wants."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.asked: list[Digest] = []
        self.gates: dict[Digest, trio.Event] = {}

    async def get_encoded(self, digest: Digest) -> tuple[framing.Encoding, bytes]:
        self.asked.append(digest)
        if (gate := self.gates.get(digest)) is not None:
            await gate.wait()
        return await super().get_encoded(digest)


def _manifest() -> Manifest:
    entries = [Entry("pkg", DIR, 0o755, 0, 0)]
    entries += [
        Entry(f"pkg/m{i}.py", FILE, 0o644, 0, len(b), d)
        for i, (b, d) in enumerate(zip(BLOBS, DIGESTS, strict=True))
    ]
    return Manifest(entries)


@asynccontextmanager
async def daemon(
    tmp_path: Path, cas: Callable[[Path], LocalCAS] = LocalCAS
) -> AsyncIterator[Daemon]:
    store = CasDir(tmp_path / "cas")
    for d, b in zip(DIGESTS[:4], BLOBS[:4], strict=True):  # the last two are not in the CAS
        store.write(d, b)
    manifest = _manifest().encode()
    mdigest = Digest.of(manifest)
    store.write(mdigest, manifest)
    store.write_ref("app:v1", mdigest)
    cache = BlobCache(tmp_path / "cache")
    local = cas(store.root)
    service = FetchService(cache, TieredSource(CasSource(local)))
    path = tmp_path / "fetcher.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    client = FetcherClient(path, timeout=10)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            prefetch = PrefetchQueue(service)
            await nursery.start(prefetch.run)
            await nursery.start(MountApi(service, prefetch).serve, sock)
            yield Daemon(client, cache, store, mdigest, local)
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
        sock.close()
        cache.close()


async def test_ensure_brings_a_verified_blob_into_the_cache(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        assert await d.client.ensure(DIGESTS[0]) == len(BLOBS[0])
        assert d.cache.path(DIGESTS[0]).read_bytes() == BLOBS[0]
        assert await d.client.ensure(DIGESTS[1], priority=Priority.PREFETCH) == len(BLOBS[1])
        stats = await d.client.stats()
        assert stats["misses"] == 1 and stats["fetches"] == 2 and stats["prefetched"] == 1


async def test_errors_cross_the_socket_typed_and_the_connection_goes_on(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        with pytest.raises(NotFound, match=DIGESTS[5].hex):
            await d.client.ensure(DIGESTS[5])
        with pytest.raises(UsageError, match="unknown request"):
            await d.client._call("frobnicate now")
        with pytest.raises(NotFound, match="app:v9"):  # kinds cross: not found, unavailable...
            await d.client.resolve("app:v9")
        with pytest.raises(NotFound, match="not in the cache"):
            await d.client.holds(d.manifest)
        assert await d.client.ensure(DIGESTS[0]) == len(BLOBS[0])  # still answering


async def test_resolve_remembers_refs_for_offline_mounts(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        with pytest.raises(NotFound, match="offline"):
            await d.client.resolve("app:v1", cached=True)
        assert await d.client.resolve("app:v1") == d.manifest
        assert await d.client.resolve("app:v1", cached=True) == d.manifest
        assert await d.client.resolve(d.manifest.hex) == d.manifest


async def test_prefetch_queues_and_fetches_in_the_background(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        assert await d.client.prefetch(DIGESTS[:4]) == 4
        await wait_for_async(
            lambda: all(d.cache.has(x) for x in DIGESTS[:4]), "the prefetched blobs"
        )
        assert (await d.client.stats())["misses"] == 0


async def test_prefetch_goes_by_the_index_and_fetches_a_listed_blob_whose_file_is_gone(
    tmp_path: Path,
) -> None:
    """Prefetch asks the index alone (no ``stat`` per blob on the daemon's loop); the warm
    pass, which opens every listed file anyway, fetches one removed behind the index."""
    async with daemon(tmp_path) as d:
        for x in DIGESTS[:2]:
            await d.client.ensure(x)
        d.cache.path(DIGESTS[0]).unlink()  # the index still lists it
        assert await d.client.prefetch(DIGESTS[:3]) == 1  # only the one the index lacks
        await wait_for_async(
            lambda: all(d.cache.has(x) for x in DIGESTS[:3]), "the gone blob fetched again"
        )
        assert d.cache.path(DIGESTS[0]).read_bytes() == BLOBS[0]
        assert (await d.client.stats())["prefetched"] == 2


async def test_holds_and_pins_of_an_executable(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        await d.client.ensure(d.manifest)
        await d.client.ensure(DIGESTS[0])
        held = await d.client.holds(d.manifest)
        assert held["blobs"] == 6 and held["missing_blobs"] == 5
        assert await d.client.pin(d.manifest) == 1
        assert await d.client.pin(d.manifest, unpin=True) == 0
        with pytest.raises(UsageError, match="not pinned"):
            await d.client.pin(d.manifest, unpin=True)


async def test_ensure_all_fetches_in_bulk_and_names_the_first_missing_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with daemon(tmp_path) as d:
        sent: list[str] = []
        call = d.client._call

        async def counted(request: str) -> object:
            sent.append(request.split(" ", 1)[0])
            return await call(request)

        monkeypatch.setattr(d.client, "_call", counted)
        progress: list[tuple[int, int]] = []
        await d.client.ensure_all(DIGESTS[:4], on_progress=lambda *p: progress.append(p))
        for x, b in zip(DIGESTS[:4], BLOBS[:4], strict=True):
            assert d.cache.path(x).read_bytes() == b
        assert sent == ["ensure_many"] and progress[-1] == (4, 4)  # one request for four
        sent.clear()  # with sizes, a request holds at most ENSURE_BYTES (at least one blob)
        big = dict.fromkeys(DIGESTS[:4], client_module.ENSURE_BYTES // 2 + 1)
        await d.client.ensure_all(DIGESTS[:4], sizes=big)
        assert sent == ["ensure_many"] * 4
        monkeypatch.setattr(client_module, "ENSURE_MANY", 2)
        order = [DIGESTS[0], DIGESTS[1], DIGESTS[5], DIGESTS[2], DIGESTS[4], DIGESTS[3]]
        with pytest.raises(BlobNotFound, match=DIGESTS[5].hex):  # not 4: the first in order
            await d.client.ensure_all(order, concurrency=3)
        assert await d.client.ensure(DIGESTS[0]) == len(BLOBS[0])  # still answering


async def test_ensure_all_asks_blob_by_blob_a_daemon_without_ensure_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatch = MountApi.dispatch

    async def older(self: MountApi, line: str, conn: object = None) -> object:
        if line.startswith("ensure_many "):
            raise UsageError(f"unknown request {line[:100]!r}")
        return await dispatch(self, line, conn)  # type: ignore[arg-type]

    monkeypatch.setattr(MountApi, "dispatch", older)
    async with daemon(tmp_path) as d:
        await d.client.ensure_all(DIGESTS[:4])
        assert all(d.cache.has(x) for x in DIGESTS[:4])
        with pytest.raises(BlobNotFound, match=DIGESTS[4].hex):
            await d.client.ensure_all([DIGESTS[0], DIGESTS[4], DIGESTS[5]])


# -- hot-set bundles -----------------------------------------------------------------------
async def _recorded(d: Daemon) -> None:
    run = Trace(d.manifest.hex, 1_700_000_000.0, [AccessRecord("pkg/m0.py", 0.01, 10)])
    await d.client.record("app", json.dumps(run.to_json()))


async def test_a_saved_run_gets_a_bundle_and_prefetch_fetches_through_it(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        plan = [DIGESTS[2], DIGESTS[0], DIGESTS[5], DIGESTS[1], DIGESTS[3]]
        assert (await d.client.bundle("app", d.manifest, plan))["bundle"] is None  # no profile
        await _recorded(d)
        made = await d.client.bundle("app", d.manifest, plan)
        assert made["built"] and made["blobs"] == 4  # the CAS lacks DIGESTS[5]
        members = [DIGESTS[2], DIGESTS[0], DIGESTS[1], DIGESTS[3]]
        again = await d.client.bundle("app", d.manifest, members)
        assert not again["built"] and again["bundle"] == made["bundle"]
        profile = await load_profile(LocalCAS(d.store.root), "app")
        assert profile is not None and profile.bundle is not None
        assert profile.bundle.digest.hex == made["bundle"] and made["parts"] == 1
        (part,) = profile.bundle.parts
        assert await d.client.prefetch_bundle([(part.digest, members)]) == 4
        await wait_for_async(lambda: all(d.cache.has(x) for x in members), "the bundle's blobs")
        for x in members:
            assert d.cache.path(x).read_bytes() == BLOBS[DIGESTS.index(x)]
        stats = await _counted(d, 4)
        assert stats["bundle_parts_fetched"] == 1 and stats["blobs_from_bundles"] == 4
        assert stats["prefetched"] == 4 and stats["misses"] == 0
        assert stats["bundle_bytes_unused"] == 0  # every record it sent was stored
        # cached already: nothing to fetch, no second stream
        assert await d.client.prefetch_bundle([(part.digest, members)]) == 0
        assert (await d.client.stats())["bundle_parts_fetched"] == 1


async def test_a_mount_asks_for_its_own_bundle_before_its_plan_and_never_for_anothers(
    tmp_path: Path,
) -> None:
    async with daemon(tmp_path) as d:
        await _recorded(d)
        members = [DIGESTS[2], DIGESTS[0], DIGESTS[1], DIGESTS[3]]
        assert (await d.client.bundle("app", d.manifest, members))["built"]
        profile = await load_profile(LocalCAS(d.store.root), "app")
        assert profile is not None and profile.bundle is not None
        # planned on another tree (the next version): left to the plan, nothing asked
        assert await prefetch_own_bundle(d.client, profile, Digest.of(b"v2")) is None
        assert await prefetch_own_bundle(d.client, None, d.manifest) is None
        assert (await d.client.stats())["prefetched"] == 0
        # planned on this one: all its blobs, through the bundle, with no plan made
        assert await prefetch_own_bundle(d.client, profile, d.manifest) == 4
        await wait_for_async(lambda: all(d.cache.has(x) for x in members), "the bundle's blobs")
        stats = await _counted(d, 4)
        assert stats["bundle_parts_fetched"] == 1 and stats["blobs_from_bundles"] == 4


async def test_a_bundle_record_of_a_blob_read_first_is_counted_unused(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        await _recorded(d)
        members = [DIGESTS[2], DIGESTS[0], DIGESTS[1], DIGESTS[3]]
        made = await d.client.bundle("app", d.manifest, members)
        assert made["built"] and made["parts"] == 1
        profile = await load_profile(LocalCAS(d.store.root), "app")
        assert profile is not None and profile.bundle is not None
        await d.client.ensure(DIGESTS[2])  # a read got there first
        (part,) = profile.bundle.parts
        assert await d.client.prefetch_bundle([(part.digest, members)]) == 3
        await wait_for_async(lambda: all(d.cache.has(x) for x in members), "the bundle's blobs")
        stats = await _counted(d, 4)
        assert stats["blobs_from_bundles"] == 3
        assert stats["bundle_bytes_unused"] == len(BLOBS[2])  # sent, not needed


async def test_a_bundle_the_store_lost_leaves_its_blobs_to_the_blob_by_blob_path(
    tmp_path: Path,
) -> None:
    async with daemon(tmp_path) as d:
        lost = Digest.of(b"a bundle GC took")
        assert await d.client.prefetch_bundle([(lost, DIGESTS[:2]), (lost, DIGESTS[2:4])]) == 4
        await wait_for_async(lambda: all(d.cache.has(x) for x in DIGESTS[:4]), "the blobs")
        stats = await d.client.stats()
        assert stats["bundle_parts_fetched"] == 0 and stats["prefetched"] == 4


@pytest.mark.parametrize("form", ["compressed", "plain batch"])
async def test_a_tampered_bundle_never_puts_bad_bytes_in_the_cache(
    tmp_path: Path, form: str
) -> None:
    async with daemon(tmp_path) as d:
        records = [(DIGESTS[0], "identity", BLOBS[0]), (DIGESTS[1], "identity", b"evil\n" * 50)]
        records.append((DIGESTS[2], "identity", BLOBS[2]))
        body = pack_part(records)[0] if form == "compressed" else pack_batch(records)
        bundle = Digest.of(body)
        d.store.write(bundle, body)
        await d.client.prefetch_bundle([(bundle, DIGESTS[:3])])
        # the record that does not verify is fetched again on its own, from the CAS
        await wait_for_async(lambda: all(d.cache.has(x) for x in DIGESTS[:3]), "the blobs")
        for x in DIGESTS[:3]:
            assert d.cache.path(x).read_bytes() == BLOBS[DIGESTS.index(x)]
        stats = await _counted(d, 3)
        assert stats["fetch_failures"] == 0 and stats["blobs_from_bundles"] == 2, stats
        assert stats["fetches"] == 3 and stats["misses"] == 0


async def test_bundle_requests_without_their_arguments_are_usage_errors(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        with pytest.raises(UsageError, match="prefetch_bundle wants"):
            await d.client._call("prefetch_bundle")
        with pytest.raises(UsageError, match="prefetch_bundle wants"):
            await d.client._call(f'prefetch_bundle {{"parts": [["{DIGESTS[0].hex}", 3]]}}')
        with pytest.raises(UsageError, match="not a blake3 digest"):
            await d.client._call('prefetch_bundle {"parts": [["ab", []]]}')
        with pytest.raises(UsageError, match="profile name"):
            await d.client._call("bundle app")
        assert await d.client.ensure(DIGESTS[0]) == len(BLOBS[0])


async def test_a_bundle_mostly_cached_already_is_not_streamed(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        await _recorded(d)
        assert (await d.client.bundle("app", d.manifest, DIGESTS[:4]))["built"]
        profile = await load_profile(LocalCAS(d.store.root), "app")
        assert profile is not None and profile.bundle is not None
        for x in DIGESTS[:3]:
            await d.client.ensure(x)
        parts = [(p.digest, list(p.blobs)) for p in profile.bundle.parts]
        assert await d.client.prefetch_bundle(parts) == 1
        await wait_for_async(lambda: d.cache.has(DIGESTS[3]), "the one blob missing")
        stats = await d.client.stats()
        assert stats["bundle_parts_fetched"] == 0 and stats["blobs_from_bundles"] == 0
        assert stats["prefetched"] == 1


def _part(d: Daemon, members: list[int]) -> Digest:
    """A bundle part of the CAS's blobs ``members`` (by index), stored; its digest."""
    body, _ = pack_part([(DIGESTS[i], framing.IDENTITY, BLOBS[i]) for i in members])
    part = Digest.of(body)
    d.store.write(part, body)
    return part


async def _counted(d: Daemon, fetches: int) -> dict[str, Any]:
    """The daemon's stats once it has counted ``fetches`` blobs stored: it counts each just
    after the blob lands in the cache, so ``cache.has`` can be true a moment before."""
    stats = await d.client.stats()
    for _ in range(3000):  # 15 s
        if stats["fetches"] >= fetches:
            break
        await trio.sleep(0.005)
        stats = await d.client.stats()
    return stats


async def _missed(d: Daemon, n: int) -> None:
    """Wait until ``n`` reads missed (each then waits, or fetched on its own), and a little."""

    async def misses() -> int:
        return int((await d.client.stats())["misses"])

    for _ in range(1000):
        if await misses() >= n:
            break
        await trio.sleep(0.01)
    await trio.sleep(0.2)  # a read that fetched on its own has asked the CAS by now


async def test_a_read_waits_for_the_bundle_part_on_its_way_and_parts_come_one_at_a_time(
    tmp_path: Path,
) -> None:
    async with daemon(tmp_path, _GatedCAS) as d:
        assert isinstance(d.cas, _GatedCAS)
        first, second = _part(d, [0, 1]), _part(d, [2, 3])
        d.cas.gates[first] = trio.Event()
        parts = [(first, DIGESTS[:2]), (second, DIGESTS[2:4])]
        assert await d.client.prefetch_bundle(parts) == 4
        await wait_for_async(lambda: first in d.cas.asked, "the first part on its way")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.client.ensure, DIGESTS[1])  # its part is on its way
            await _missed(d, 1)
            # neither a fetch of its own (it would come twice), nor the second part (it
            # would share the link with the first, whose blobs the run reads first)
            assert d.cas.asked == [first]
            d.cas.gates[first].set()
        await wait_for_async(lambda: all(d.cache.has(x) for x in DIGESTS[:4]), "the blobs")
        assert d.cas.asked == [first, second]
        assert d.cache.path(DIGESTS[1]).read_bytes() == BLOBS[1]
        stats = await _counted(d, 4)
        assert stats["misses"] == 1 and stats["blobs_from_bundles"] == 4
        assert stats["bundle_parts_fetched"] == 2 and stats["bundle_bytes_unused"] == 0


async def test_a_read_does_not_wait_for_a_stalled_part_nor_for_one_not_asked_for_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "_PART_STALL", 0.2)
    async with daemon(tmp_path, _GatedCAS) as d:
        assert isinstance(d.cas, _GatedCAS)
        first, second = _part(d, [0, 1]), _part(d, [2, 3])
        d.cas.gates[first] = trio.Event()  # on its way, and nothing comes
        parts = [(first, DIGESTS[:2]), (second, DIGESTS[2:4])]
        assert await d.client.prefetch_bundle(parts) == 4
        await wait_for_async(lambda: first in d.cas.asked, "the first part on its way")
        with trio.fail_after(10):
            assert await d.client.ensure(DIGESTS[1]) == len(BLOBS[1])  # after the stall
            assert await d.client.ensure(DIGESTS[3]) == len(BLOBS[3])  # its part not asked
        assert d.cas.asked == [first, DIGESTS[1], DIGESTS[3]]
        d.cas.gates[first].set()
        await wait_for_async(lambda: all(d.cache.has(x) for x in DIGESTS[:4]), "the blobs")
        await wait_for_async(lambda: second in d.cas.asked, "the second part")
        for x in DIGESTS[:4]:
            assert d.cache.path(x).read_bytes() == BLOBS[DIGESTS.index(x)]
        stats = await _counted(d, 4)
        assert stats["misses"] == 2 and stats["fetch_failures"] == 0
        assert stats["blobs_from_bundles"] == 2  # DIGESTS[0] and [2]: the reads had the others
        assert stats["bundle_bytes_unused"] == len(BLOBS[1]) + len(BLOBS[3])
