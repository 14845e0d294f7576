"""Encoded writes: blobs stored as their zstd frames with BTRFS_IOC_ENCODED_WRITE, on a real
Btrfs loop image, and the plain-write fallback where the ioctl is refused."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from pathlib import Path

import pytest

from fetcher.cache.blobcache import ENCODED_WRITES_ENV, BlobCache, filesystem_type
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import DigestMismatch
from lazycaf.core.verified import verify_blob
from lazycaf.disk.btrfs_encoded import Frame, extent_fits, frames_of, write_frames
from tests.conftest import require

KiB = 1 << 10
SECTOR = 4 * KiB

_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQ2QI3I")  # logical, physical, length, ..., flags, ...
_FLAG_SYNC = 0x1
_EXTENT_ENCODED = 0x8


def extents(path: Path) -> list[tuple[int, int, bool]]:
    """(logical offset, length, encoded) of each extent of ``path`` (FIEMAP, synced first)."""
    count = 512
    buf = bytearray(_FIEMAP_HEAD.pack(0, 2**64 - 1, _FLAG_SYNC, 0, count, 0))
    buf += bytes(_FIEMAP_EXTENT.size * count)
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), _FIEMAP, buf, True)
    mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
    out = []
    for i in range(mapped):
        ext = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
        out.append((ext[0], ext[2], bool(ext[5] & _EXTENT_ENCODED)))
    return out


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def text(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that compress well but not to nothing."""
    line = b"".join(b"line %d of blob %d: import numpy as np\n" % (i, seed) for i in range(4000))
    return (line * (n // len(line) + 1))[:n]


@pytest.fixture
def no_compress_dir(btrfs_dir: Path, tmp_path: Path) -> Path:
    """A directory on the Btrfs image where Btrfs itself does not compress (NOCOMPRESS,
    inherited by what is created in it): there, only an encoded write makes an encoded
    extent, so FIEMAP tells which path a blob took."""
    require(os.geteuid() == 0, "root (CAP_SYS_ADMIN) is needed for encoded writes")
    d = btrfs_dir / f"nocompress-{tmp_path.name}"
    d.mkdir()
    subprocess.run(
        ["btrfs", "property", "set", str(d), "compression", "none"],
        check=True,
        capture_output=True,
    )
    return d


def store(cache: BlobCache, data: bytes) -> tuple[Digest, Path]:
    digest = Digest.of(data)
    encoding, payload = framing.encode(data)
    assert cache.commit(digest, encoding, payload) == len(data)
    return digest, cache.path(digest)


# -- which extents are written encoded (pure) --------------------------------------------
def frame(size: int, stored: int) -> Frame:
    return Frame(0, stored, size)


def test_extent_fits_when_aligned_within_128k_and_saving_a_sector() -> None:
    big = 1 << 20
    assert extent_fits(frame(128 * KiB, 20 * KiB), 0, big, SECTOR)
    assert extent_fits(frame(128 * KiB, 20 * KiB), 128 * KiB, big, SECTOR)
    assert not extent_fits(frame(128 * KiB, 20 * KiB), 100 * KiB + 1, big, SECTOR)  # unaligned
    assert not extent_fits(frame(256 * KiB, 20 * KiB), 0, big, SECTOR)  # over 128 KiB of data
    assert not extent_fits(frame(128 * KiB, 125 * KiB), 0, big, SECTOR)  # saves no sector
    assert not extent_fits(frame(128 * KiB, 128 * KiB + 9), 0, big, SECTOR)  # grew


def test_only_the_last_extent_may_end_unaligned() -> None:
    assert extent_fits(frame(10_000, 2_000), 128 * KiB, 128 * KiB + 10_000, SECTOR)
    assert not extent_fits(frame(10_000, 2_000), 0, 128 * KiB, SECTOR)


def test_a_file_smaller_than_a_sector_fits_when_it_shrinks() -> None:
    assert extent_fits(frame(600, 29), 0, 600, SECTOR)  # Btrfs may keep it inline
    assert not extent_fits(frame(600, 600), 0, 600, SECTOR)


# -- on a real Btrfs -----------------------------------------------------------------------
def test_encoded_blobs_read_back_identical_as_compressed_extents(no_compress_dir: Path) -> None:
    cache = BlobCache(no_compress_dir / "cache", encoded_writes=True)
    try:
        data = text(1 * (1 << 20) + 12_345)  # 9 frames, the last one short
        _, path = store(cache, data)
        assert path.read_bytes() == data
        found = extents(path)
        assert found and all(encoded for _, _, encoded in found), found
        assert sum(length for _, length, _ in found) >= len(data)
        stats = cache.write_statistics()
        assert stats.encoded_extents == 9 and stats.encoded_bytes == len(data)
        assert stats.plain_bytes == 0 and stats.encoded_supported

        small = text(700, seed=1)  # one frame, smaller than a sector
        _, small_path = store(cache, small)
        assert small_path.read_bytes() == small

        # an incompressible middle: those frames go plain, the others encoded
        mixed = text(256 * KiB, seed=2) + os.urandom(256 * KiB) + text(200 * KiB, seed=3)
        _, mixed_path = store(cache, mixed)
        assert mixed_path.read_bytes() == mixed
        slots: dict[int, bool] = {}  # 128 KiB slot (frame) -> written encoded
        for off, length, enc in extents(mixed_path):
            for slot in range(off // (128 * KiB), -(-(off + length) // (128 * KiB))):
                slots[slot] = enc
        assert slots == {0: True, 1: True, 2: False, 3: False, 4: True, 5: True}
        # out of the page cache, the blobs still read back from disk intact
        for p, want in ((path, data), (small_path, small), (mixed_path, mixed)):
            drop_page_cache(p)
            assert p.read_bytes() == want
    finally:
        cache.close()


def test_plain_writes_in_the_same_place_are_not_encoded(no_compress_dir: Path) -> None:
    cache = BlobCache(no_compress_dir / "cache", encoded_writes=False)
    try:
        data = text(512 * KiB)
        _, path = store(cache, data)
        assert path.read_bytes() == data
        assert not any(encoded for _, _, encoded in extents(path))
        assert cache.write_statistics().encoded_extents == 0
        # one blob can still ask for an encoded write
        other = text(512 * KiB, seed=1)
        staged = cache.stage(verify_blob(Digest.of(other), *framing.encode(other)), encoded=True)
        assert all(encoded for _, _, encoded in extents(staged.tmp))
        assert staged.tmp.read_bytes() == other
        cache.discard(staged)
    finally:
        cache.close()


def test_the_environment_turns_encoded_writes_on(
    no_compress_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENCODED_WRITES_ENV, "1")
    cache = BlobCache(no_compress_dir / "cache")  # as the daemon opens it
    try:
        _, path = store(cache, text(256 * KiB))
        assert all(encoded for _, _, encoded in extents(path))
    finally:
        cache.close()


def test_a_blob_that_does_not_verify_is_never_written(no_compress_dir: Path) -> None:
    cache = BlobCache(no_compress_dir / "cache", encoded_writes=True)
    try:
        data = text(300 * KiB)
        encoding, payload = framing.encode(data)
        with pytest.raises(DigestMismatch):
            cache.commit(Digest.of(b"something else"), encoding, payload)
        assert list((cache.root / "tmp").iterdir()) == []
        assert cache.write_statistics().encoded_extents == 0
    finally:
        cache.close()


def test_a_nocow_file_refuses_each_extent_and_gets_plain_bytes(
    btrfs_dir: Path, tmp_path: Path
) -> None:
    require(os.geteuid() == 0, "root (CAP_SYS_ADMIN) is needed for encoded writes")
    path = btrfs_dir / f"nocow-{tmp_path.name}"
    path.touch()
    subprocess.run(["chattr", "+C", str(path)], check=True)
    data = text(300 * KiB)
    _, payload = framing.encode(data)
    fd = os.open(path, os.O_WRONLY)
    try:
        res = write_frames(fd, payload, frames_of(payload), data, sector=SECTOR)
    finally:
        os.close(fd)
    assert res.encoded == 0 and res.plain_bytes == len(data)
    assert res.refused_errno is None  # EINVAL refuses one extent, not the filesystem
    assert path.read_bytes() == data


def test_elsewhere_the_cache_falls_back_to_plain_writes(tmp_path: Path) -> None:
    require(filesystem_type(tmp_path) != "btrfs", "the test's temp dir must not be on Btrfs")
    cache = BlobCache(tmp_path / "cache", encoded_writes=True)
    try:
        blobs = [text(400 * KiB, seed=i) for i in range(3)]
        for data in blobs:
            _, path = store(cache, data)
            assert path.read_bytes() == data
        stats = cache.write_statistics()
        assert stats.encoded_extents == 0 and stats.plain_bytes == sum(map(len, blobs))
        assert not stats.encoded_supported  # refused once (ENOTTY), then not tried again
    finally:
        cache.close()
