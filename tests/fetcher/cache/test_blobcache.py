"""BlobCache's staging and group publish: temp names, the budget per blob, pins kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fetcher.cache.blobcache import BlobCache
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.verified import verify_blob


def _blob(i: int, size: int = 1000) -> tuple[Digest, bytes]:
    data = bytes([i]) * size
    return Digest.of(data), data


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    c = BlobCache(tmp_path / "cache")
    yield c
    c.close()


def test_publish_many_within_a_budget_keeps_the_rest_staged(cache: BlobCache) -> None:
    blobs = [_blob(i) for i in range(4)]
    staged = [cache.stage(verify_blob(d, framing.IDENTITY, data)) for d, data in blobs]
    names = sorted(os.listdir(cache.layout.tmp))
    assert [n.split(".")[0] for n in names] == sorted(d.hex[:16] for d, _ in blobs)
    assert all(os.stat(s.tmp).st_mode & 0o777 == 0o444 for s in staged)

    assert cache.publish_many(staged, limit=2500) == [True, True, False, False]
    assert cache.usage == 2000 and len(cache.index) == 2
    assert all(cache.has(d) for d, _ in blobs[:2]) and not cache.has(blobs[2][0])
    assert staged[2].tmp.exists() and staged[3].tmp.exists()  # kept for a later publish
    assert cache.publish_many(staged[2:], limit=None) == [True, True]
    assert cache.usage == 4000 and os.listdir(cache.layout.tmp) == []
    assert cache.path(blobs[3][0]).read_bytes() == blobs[3][1]


def test_publishing_a_known_blob_again_counts_it_once(cache: BlobCache) -> None:
    d, data = _blob(7)
    cache.commit(d, framing.IDENTITY, data)
    cache.path(d).unlink()  # lost behind the cache's back, then fetched again
    (done,) = cache.publish_many([cache.stage(verify_blob(d, framing.IDENTITY, data))], limit=0)
    assert done is True  # already counted: the budget does not hold it back
    rec = cache.index.get(d)
    assert rec is not None and not rec.synced
    assert cache.usage == 1000 and cache.path(d).read_bytes() == data


def test_a_shard_removed_behind_the_cache_is_made_again(cache: BlobCache) -> None:
    d, data = _blob(1)
    cache.commit(d, framing.IDENTITY, data)
    shard = cache.path(d).parent
    cache.path(d).unlink()
    shard.rmdir()
    assert cache.publish(cache.stage(verify_blob(d, framing.IDENTITY, data)), limit=None)
    assert cache.path(d).read_bytes() == data


def test_evicting_a_manifest_removes_its_index_and_a_mapped_one_keeps_reading(
    cache: BlobCache,
) -> None:
    from lazycaf.core.manifest import FILE, Entry, Manifest
    from lazycaf.mount.indexfile import open_index

    d, data = _blob(7)
    other, other_data = _blob(8)
    manifest = Manifest([Entry("m.py", FILE, 0o644, 0, len(data), d)]).encode()
    m = Digest.of(manifest)
    for digest, blob in ((m, manifest), (d, data), (other, other_data)):
        assert cache.publish(cache.stage(verify_blob(digest, framing.IDENTITY, blob)), limit=None)
    index = open_index(cache.layout, m, name="test")  # what a mount does: builds the file
    path = cache.layout.manifest_index(m)
    assert path.exists()
    cache.evict([d, other])  # not manifests: the index stays
    assert path.exists()
    cache.evict([m])
    assert not path.exists() and list(cache.layout.manifests.iterdir()) == []
    assert index.entry(0).path == "m.py"  # the mapped index is still readable
