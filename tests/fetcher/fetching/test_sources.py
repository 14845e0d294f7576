"""One contract, every ``BlobSource``: the CAS source (a local directory, the HTTP CAS
server in-process), the peer source (a real peer API served by hypercorn over a fetch
service of its own) and the tiered source (without peers, and with that peer as every
blob's home).

What every source promises: a stored blob comes back as bytes that ``verify_blob`` accepts
(the source itself verifies nothing), a blob it lacks is ``BlobNotFound``, ``fetch_many``
gives what it has and leaves the rest out, and both priorities work. Then what only the
tiered source does: a failing home peer is backed off and the CAS answers.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from fetcher.cache.blobcache import BlobCache
from fetcher.casserver.app import CasApp
from fetcher.casserver.served import ServedDir
from fetcher.daemon.peerapp import PeerApp
from fetcher.fetching.peersource import PeerSources
from fetcher.fetching.service import FetchService
from fetcher.fetching.source import BlobSource, Fetched
from fetcher.fetching.sources import CasSource, TieredSource
from fetcher.peers.peerset import PeerSet
from fetcher.web.asgi import bind_socket, serve_app
from lazycaf.cas.bundlepart import pack_part
from lazycaf.cas.casdir import CasDir
from lazycaf.cas.http import NEAR_END_BYTES, HttpCAS
from lazycaf.cas.local import LocalCAS
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, DigestMismatch, PeerUnavailable
from lazycaf.core.priority import Priority
from lazycaf.core.verified import verify_blob

BLOBS = [b"small", b"x" * 300_000, bytes(range(256)) * 2000]  # raw, zstd, several frames
MISSING = Digest.of(b"never stored")

Maker = Callable[[Path, trio.Nursery], Awaitable[BlobSource]]


def _store(root: Path) -> list[Digest]:
    store = CasDir(root)
    digests = [Digest.of(b) for b in BLOBS]
    for d, b in zip(digests, BLOBS, strict=True):
        store.write(d, b)
    return digests


async def _serve(nursery: trio.Nursery, app: object) -> str:
    sock = bind_socket("127.0.0.1:0")
    host, port = sock.getsockname()[:2]
    await nursery.start(serve_app, app, sock)
    sock.close()  # hypercorn serves a duplicate of it
    return f"{host}:{port}"


async def _local(root: Path, nursery: trio.Nursery) -> BlobSource:
    return CasSource(LocalCAS(root))


async def _http(root: Path, nursery: trio.Nursery) -> BlobSource:
    address = await _serve(nursery, CasApp(ServedDir(CasDir(root))))
    return CasSource(HttpCAS(f"http://{address}"), HttpCAS(f"http://{address}"))


_PEER_CACHES: list[BlobCache] = []  # closed by ``opened`` once the peers' nursery is done


async def _peer_daemon(root: Path, nursery: trio.Nursery) -> str:
    """A peer: its own cache, pulling from the CAS at ``root``, its peer API on a port."""
    cache = BlobCache(root.parent / f"peer-cache-{root.name}")
    _PEER_CACHES.append(cache)
    service = FetchService(cache, TieredSource(CasSource(LocalCAS(root))))
    await nursery.start(service.run)
    return await _serve(nursery, PeerApp(service, PeerSet(), instance="peer"))


class _OnePeer:
    """``PeerSource`` of one address, closing the clients of its ``PeerSources`` with it."""

    def __init__(self, address: str) -> None:
        self._sources = PeerSources(instance="asker")
        self._source = self._sources(address)
        self.where = self._source.where
        self.fetch = self._source.fetch
        self.fetch_many = self._source.fetch_many

    async def aclose(self) -> None:
        await self._sources.aclose()


async def _peer(root: Path, nursery: trio.Nursery) -> BlobSource:
    return _OnePeer(await _peer_daemon(root, nursery))


async def _tiered_no_peers(root: Path, nursery: trio.Nursery) -> BlobSource:
    return TieredSource(CasSource(LocalCAS(root)))


async def _tiered_with_peer(root: Path, nursery: trio.Nursery) -> BlobSource:
    """The peer is every blob's home (the only other member; this daemon has no address)."""
    address = await _peer_daemon(root, nursery)
    peers = PeerSet(addresses=[address])
    return TieredSource(
        CasSource(LocalCAS(root.parent / "elsewhere")),  # empty: only the peer has the blobs
        peers=peers,
        peer_sources=PeerSources(instance="asker"),
    )


MAKERS: dict[str, Maker] = {
    "cas-local": _local,
    "cas-http": _http,
    "peer": _peer,
    "tiered": _tiered_no_peers,
    "tiered-peer": _tiered_with_peer,
}


@asynccontextmanager
async def opened(kind: str, tmp_path: Path) -> AsyncIterator[tuple[BlobSource, list[Digest]]]:
    root = tmp_path / "cas"
    digests = _store(root)
    CasDir(tmp_path / "elsewhere")
    try:
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            source = await MAKERS[kind](root, nursery)
            stack.push_async_callback(source.aclose)
            try:
                yield source, digests
            finally:
                nursery.cancel_scope.cancel()
    finally:
        while _PEER_CACHES:  # its service has stopped: no thread uses its index now
            _PEER_CACHES.pop().close()


@pytest.fixture(params=sorted(MAKERS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("priority", list(Priority))
async def test_a_stored_blob_comes_back_as_bytes_that_verify(
    kind: str, tmp_path: Path, priority: Priority
) -> None:
    async with opened(kind, tmp_path) as (source, digests):
        for d, data in zip(digests, BLOBS, strict=True):
            fetched = await source.fetch(d, priority)
            assert fetched.encoding in (framing.IDENTITY, framing.ZSTD)
            assert verify_blob(d, fetched.encoding, fetched.payload).data == data
            assert fetched.origin == ("peer" if kind in ("peer", "tiered-peer") else "cas")


async def test_a_missing_blob_is_not_found(kind: str, tmp_path: Path) -> None:
    async with opened(kind, tmp_path) as (source, _):
        with pytest.raises(BlobNotFound):
            await source.fetch(MISSING, Priority.DEMAND)


async def test_many_blobs_give_what_the_source_has(kind: str, tmp_path: Path) -> None:
    async with opened(kind, tmp_path) as (source, digests):
        got, error = await source.fetch_many([*digests, MISSING, digests[0]], Priority.PREFETCH)
        assert error is None
        assert set(got) == set(digests)
        for d, data in zip(digests, BLOBS, strict=True):
            assert verify_blob(d, got[d].encoding, got[d].payload).data == data
        assert await source.fetch_many([], Priority.DEMAND) == ({}, None)


async def test_bytes_that_do_not_verify_are_passed_on_for_the_service_to_refuse(
    kind: str, tmp_path: Path
) -> None:
    """Sources do not verify: a blob stored under the wrong name comes back as stored, and
    ``verify_blob`` (the service's one check) refuses it."""
    wrong = Digest.of(b"what the name promises")
    async with opened(kind, tmp_path) as (source, _):
        path = tmp_path / "cas" / "blobs" / wrong.hex[:2] / wrong.hex
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"something else")
        if kind in ("peer", "tiered-peer"):
            # a peer's own service verifies what it pulls from its CAS: it serves nothing,
            # and the tiered source's CAS (empty here) does not have the blob either
            with pytest.raises((BlobNotFound, PeerUnavailable)):
                await source.fetch(wrong, Priority.DEMAND)
            return
        fetched = await source.fetch(wrong, Priority.DEMAND)
        with pytest.raises(DigestMismatch):
            verify_blob(wrong, fetched.encoding, fetched.payload)


async def test_a_home_that_fails_is_backed_off_and_the_cas_answers(tmp_path: Path) -> None:
    root = tmp_path / "cas"
    digests = _store(root)
    with socket.socket() as s:  # a port nobody listens on: the home refuses connections
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    peers = PeerSet(addresses=[dead])
    source = TieredSource(
        CasSource(LocalCAS(root)), peers=peers, peer_sources=PeerSources(timeout=2.0)
    )
    try:
        assert source.first_peer(digests[0]) == dead
        fetched = await source.fetch(digests[0], Priority.DEMAND)
        assert fetched.origin == "cas"
        assert source.first_peer(digests[1]) is None  # backed off: the CAS directly
        got, error = await source.fetch_many(digests, Priority.PREFETCH)
        assert error is None and set(got) == set(digests)
        assert {f.origin for f in got.values()} == {"cas"}
    finally:
        await source.aclose()


@pytest.mark.parametrize("kind", ["cas-local", "cas-http"])
async def test_a_bundle_part_streams_its_records_and_says_once_that_its_end_is_near(
    kind: str, tmp_path: Path
) -> None:
    """A part larger than ``NEAR_END_BYTES`` (records that do not compress): its records in
    order, and ``near_end`` once; over HTTP before the last records are handed over (the
    daemon asks for the next part then), from a directory once the part is read."""
    rng = random.Random(7)
    datas = [rng.randbytes(300_000) for _ in range(8)]
    records = [(Digest.of(b), framing.IDENTITY, b) for b in datas]
    body, _ = pack_part(records)
    assert len(body) > 2 * NEAR_END_BYTES
    part = Digest.of(body)
    events: list[str] = []
    got: list[Digest] = []

    async def arrived(batch: dict[Digest, Fetched]) -> None:
        assert {f.bundle for f in batch.values()} == {part.hex}
        got.extend(batch)
        events.append("records")

    async with opened(kind, tmp_path) as (source, _):
        CasDir(tmp_path / "cas").write(part, body)
        assert isinstance(source, CasSource)
        await source.stream_bundle(part, Priority.PREFETCH, arrived, lambda: events.append("near"))
    assert got == [d for d, _, _ in records]
    assert events.count("near") == 1
    assert events[-1] == "records"
