"""The S3 backend beyond the contract suite: the server really enforces conditional PUTs, the
layout at rest, ``open_cas("s3://...")``, and read-modify-write ref updates that lose none.

Against the session's real SeaweedFS server (``s3_server``), never a mock."""

from __future__ import annotations

import os
import secrets

import httpx
import obstore
import pytest
import trio
from obstore.exceptions import AlreadyExistsError, PreconditionError
from obstore.store import S3Store

from lazycaf.cas import s3
from lazycaf.cas.api import open_cas
from lazycaf.cas.s3 import S3CAS, parse_s3_url
from lazycaf.core.digest import Digest
from lazycaf.core.errors import RefMoved, UsageError
from tests.s3server import S3Server


def _store(s3: S3Server, prefix: str) -> S3Store:
    config = s3.config()
    return S3Store(s3.bucket, prefix=prefix, config=config, client_options={"allow_http": True})


def _prefix() -> str:
    return f"s3test-{secrets.token_hex(6)}"


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://b") == ("b", "")
    assert parse_s3_url("s3://b/") == ("b", "")
    assert parse_s3_url("s3://b/team/cas/") == ("b", "team/cas")
    for bad in ("s3://", "s3:///x", "s3://b/a//c", "http://b"):
        with pytest.raises(UsageError):
            parse_s3_url(bad)


def test_server_enforces_conditional_puts(s3_server: S3Server) -> None:
    """What the ref compare-and-swap stands on: 412 when If-None-Match: * or If-Match fail."""
    store = _store(s3_server, _prefix())
    first = obstore.put(store, "k", b"one", mode="create")
    with pytest.raises((AlreadyExistsError, PreconditionError)):
        obstore.put(store, "k", b"two", mode="create")
    second = obstore.put(store, "k", b"two", mode={"e_tag": first["e_tag"] or ""})
    with pytest.raises(PreconditionError):  # the ETag of "one" no longer holds
        obstore.put(store, "k", b"three", mode={"e_tag": first["e_tag"] or ""})
    assert bytes(obstore.get(store, "k").bytes()) == b"two"
    assert second["e_tag"] != first["e_tag"]


def test_unsigned_requests_are_refused(s3_server: S3Server) -> None:
    r = httpx.get(f"{s3_server.endpoint}/{s3_server.bucket}?list-type=2", timeout=5)
    assert r.status_code == 403


async def test_blobs_at_rest_are_frames_or_raw_with_the_encoding_in_metadata(
    s3_server: S3Server,
) -> None:
    prefix = _prefix()
    cas = S3CAS(f"s3://{s3_server.bucket}/{prefix}", config=s3_server.config())
    text, noise = b"compress me " * 20_000, os.urandom(50_000)
    for data in (text, noise):
        assert await cas.put(Digest.of(data), data) is True
    raw = _store(s3_server, prefix)
    d = Digest.of(text)
    stored = obstore.get(raw, f"blobs/{d.hex[:2]}/{d.hex}")
    assert stored.attributes.get("Content-Encoding") == "zstd"
    assert bytes(stored.bytes()).startswith(b"\x28\xb5\x2f\xfd") and stored.meta["size"] < 5000
    n = Digest.of(noise)
    stored = obstore.get(raw, f"blobs/{n.hex[:2]}/{n.hex}")
    assert "Content-Encoding" not in stored.attributes
    assert bytes(stored.bytes()) == noise
    await cas.aclose()


async def test_open_cas_reads_the_aws_environment(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    url = f"s3://{s3_server.bucket}/{_prefix()}"
    cas = open_cas(url)
    assert isinstance(cas, S3CAS) and cas.where == url
    data = b"through open_cas"
    await cas.put(Digest.of(data), data)
    await cas.set_ref("x:latest", Digest.of(data), expected=None)
    assert await cas.get(await cas.get_ref("x:latest")) == data
    await cas.aclose()


@pytest.mark.slow  # about 2 s: the writers retry until each has landed
async def test_read_modify_write_updates_lose_none(s3_server: S3Server) -> None:
    """Writers each append one blob to a chain held by a ref, retrying on RefMoved: with a
    real compare-and-swap the chain ends holding every writer's link exactly once."""
    cas = S3CAS(f"s3://{s3_server.bucket}/{_prefix()}", config=s3_server.config())
    root = b"chain:"
    await cas.put(Digest.of(root), root)
    await cas.set_ref("chain", Digest.of(root), expected=None)
    lost_races = 0

    async def append(i: int) -> None:
        nonlocal lost_races
        while True:
            head = await cas.get_ref("chain")
            data = await cas.get(head) + f"{i},".encode()
            await cas.put(Digest.of(data), data)
            try:
                await cas.set_ref("chain", Digest.of(data), expected=head)
                return
            except RefMoved:
                lost_races += 1

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(append, i)
    final = await cas.get(await cas.get_ref("chain"))
    links = final.removeprefix(root).decode().rstrip(",").split(",")
    assert sorted(map(int, links)) == list(range(8))
    assert lost_races > 0, "the writers never raced: the test proved nothing"
    await cas.aclose()


@pytest.mark.parametrize("factor", [100, 0])
async def test_a_large_find_missing_lists_shards_or_heads_by_store_size(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, factor: int
) -> None:
    """Above ``LIST_MIN`` digests the blob shards are LISTed (the store is small next to the
    query); with a ``LIST_FACTOR`` no store meets, every digest is HEADed. Same answer."""
    monkeypatch.setattr(s3, "LIST_MIN", 5)
    monkeypatch.setattr(s3, "LIST_FACTOR", factor)
    listed: list[str] = []
    real = s3._list_shard

    def spy(store: S3Store, prefix: str) -> dict[str, float]:
        listed.append(prefix)
        return real(store, prefix)

    monkeypatch.setattr(s3, "_list_shard", spy)
    cas = S3CAS(f"s3://{s3_server.bucket}/{_prefix()}", config=s3_server.config())
    present = [os.urandom(40) for _ in range(12)]
    await cas.put_many([(Digest.of(b), b) for b in present])
    absent = [Digest.of(os.urandom(40)) for _ in range(12)]
    query = [Digest.of(b) for b in present] + absent
    assert await cas.find_missing(query + query[:3]) == set(absent)
    shards = {f"blobs/{d.hex[:2]}/" for d in query}
    assert set(listed) == (shards if factor else {min(shards)})  # one shard sizes the store


async def test_listing_find_missing_refreshes_old_blobs(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3, "LIST_MIN", 2)
    url = f"s3://{s3_server.bucket}/{_prefix()}"
    cas = S3CAS(url, config=s3_server.config())
    blobs = [os.urandom(40) for _ in range(4)]
    await cas.put_many([(Digest.of(b), b) for b in blobs])
    before = {b.digest: b.mtime for b in await cas.list_blobs()}
    await trio.sleep(1.1)  # LastModified has a resolution of a second
    refreshing = S3CAS(url, config=s3_server.config(), refresh_after=0.5)
    assert await refreshing.find_missing(list(before)) == set()
    after = {b.digest: b.mtime for b in await cas.list_blobs()}
    assert after.keys() == before.keys()
    assert all(after[d] > before[d] for d in before)  # each re-written: its age restarts
    for b in blobs:
        assert await cas.get(Digest.of(b)) == b
