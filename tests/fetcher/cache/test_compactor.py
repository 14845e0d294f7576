"""Compression deferred on a real Btrfs cache: blobs fetched are written plain (no zstd in the
kernel's writeback while a job waits), marked so in the index, and compressed later: by
``BlobCache.compress``, by the daemon's compactor once fetching went quiet, and after a
restart for what a stopped daemon left plain."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fetcher.cache.blobcache import BlobCache, init_cache_dir
from fetcher.cache.compactor import Compactor
from fetcher.cache.diskusage import compression
from lazycaf.core.digest import Digest
from lazycaf.core.verified import verify_blob
from tests.conftest import Host
from tests.helpers import run_cli, wait_for, wait_for_async


def text(n: int, seed: int = 0) -> bytes:
    line = b"".join(b"line %d of blob %d: import numpy as np\n" % (i, seed) for i in range(4000))
    return (line * (n // len(line) + 1))[:n]


def put(cache: BlobCache, data: bytes) -> Digest:
    digest = Digest.of(data)
    assert cache.publish(cache.stage(verify_blob(digest, "identity", data)), limit=None)
    return digest


def on_disk(cache: BlobCache) -> int:
    os.sync()
    return compression(cache.layout.blobs).disk_bytes


@pytest.fixture
def btrfs_cache(btrfs_dir: Path, tmp_path: Path) -> Path:
    root = btrfs_dir / f"cache-{tmp_path.name}"
    assert init_cache_dir(root) == ("btrfs", True)
    return root


def test_blobs_land_plain_and_compress_later(btrfs_cache: Path) -> None:
    cache = BlobCache(btrfs_cache, defer_compression=True)
    try:
        assert cache.writes_plain
        blobs = [put(cache, text(1 << 20, seed=i)) for i in range(8)]
        assert on_disk(cache) >= 8 << 20  # as written: no compression
        rec = cache.index.get(blobs[0])
        assert rec is not None and rec.plain
        landed = cache.take_plain()
        assert [d for d, _ in landed] == blobs and cache.take_plain() == []
        gone = Digest.of(b"evicted before its turn")
        assert cache.compress([*landed, (gone, 10)]) == 8 << 20
        assert on_disk(cache) < 2 << 20  # rewritten compressed
        assert all(not r.plain for _, r in cache.index.items())
        for i, d in enumerate(blobs):  # the same bytes
            assert cache.path(d).read_bytes() == text(1 << 20, seed=i)
        assert cache.compression_statistics() == (8, 8 << 20)
    finally:
        cache.index.close()


def test_a_restart_hands_over_what_was_left_plain(btrfs_cache: Path) -> None:
    cache = BlobCache(btrfs_cache, defer_compression=True)
    blobs = [put(cache, text(300_000, seed=i)) for i in range(3)]
    cache.index.close()
    again = BlobCache(btrfs_cache, defer_compression=False)  # a daemon that stopped deferring
    try:
        again.reconcile()
        assert sorted(d for d, _ in again.take_plain()) == sorted(blobs)
        assert not again.writes_plain
        before = on_disk(again)
        later = put(again, text(1 << 20, seed=9))  # compressed as it is written, as before
        rec = again.index.get(later)
        assert rec is not None and not rec.plain
        assert on_disk(again) - before < 300_000
    finally:
        again.index.close()


def test_a_cache_off_btrfs_writes_as_before(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", defer_compression=True)
    try:
        assert not cache.writes_plain
        d = put(cache, text(10_000))
        rec = cache.index.get(d)
        assert rec is not None and not rec.plain and cache.take_plain() == []
    finally:
        cache.index.close()


async def test_the_compactor_waits_for_quiet(btrfs_cache: Path) -> None:
    cache = BlobCache(btrfs_cache, defer_compression=True)
    busy = [True]
    compactor = Compactor(cache, lambda: busy[0], idle_s=0.5)
    try:
        blobs = [put(cache, text(1 << 20, seed=i)) for i in range(4)]
        async with trio.open_nursery() as nursery:
            await nursery.start(compactor.run)
            await trio.sleep(1.5)
            assert compactor.pending == 4  # fetching: nothing compressed
            busy[0] = False
            await wait_for_async(
                lambda: not compactor.pending and cache.compression_statistics()[0] == 4,
                "the compactor",
                timeout=10,
            )
            nursery.cancel_scope.cancel()
        assert all(not r.plain for d, r in cache.index.items() if d in blobs)
        assert on_disk(cache) < 1 << 20
    finally:
        cache.index.close()


async def test_a_host_that_never_goes_quiet_still_compresses_past_the_backlog(
    btrfs_cache: Path,
) -> None:
    cache = BlobCache(btrfs_cache, defer_compression=True)
    compactor = Compactor(cache, lambda: True, idle_s=0.5, backlog_bytes=3 << 20)
    try:
        for i in range(5):
            put(cache, text(1 << 20, seed=i))
        async with trio.open_nursery() as nursery:
            await nursery.start(compactor.run)
            await wait_for_async(
                lambda: cache.compression_statistics()[0] > 0, "the backlog's batch", timeout=10
            )
            nursery.cancel_scope.cancel()
        assert compactor.pending < 5  # it took a batch while the host was busy
    finally:
        cache.index.close()


def test_the_daemon_compresses_what_a_mount_fetched(host: Host, tmp_path: Path) -> None:
    """Through the doors a user has: a mount reads files, the daemon fetched them plain, and
    once fetching is quiet they are compressed (``stats``, ``cache status``)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(6):
        (tree / f"mod{i}.py").write_bytes(text(400_000, seed=i))
    cas = tmp_path / "cas"
    run_cli("pack", tree, "--cas", cas, "--tag", "t:v1")
    mnt = host.mountpoint()
    host.cli("mount", "t:v1", mnt, "--cas", cas)
    for i in range(6):
        assert (mnt / f"mod{i}.py").read_bytes() == text(400_000, seed=i)
    wait_for(lambda: host.stats()["compressed_later_blobs"] >= 6, "the compactor", timeout=30)
    host.cli("umount", mnt)
    os.sync()
    status = host.cli("cache", "status", "--json")
    assert b'"ratio"' in status.stdout
    comp = compression(host.cache / "blobs")
    assert comp.ratio is not None and comp.ratio > 3, comp
