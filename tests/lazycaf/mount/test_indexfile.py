"""Tests for lazycaf.mount.indexfile: the manifest index is built once per manifest on a
host, shared after, and built again when the file is not a good index."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazycaf.core.digest import Digest
from lazycaf.core.errors import ManifestError
from lazycaf.host.paths import CacheLayout
from lazycaf.mount.indexfile import open_index
from tests.lazycaf.core.test_manifestindex import MANIFEST


def cached(tmp_path: Path, data: bytes) -> tuple[CacheLayout, Digest]:
    cache = CacheLayout(tmp_path / "cache")
    digest = Digest.of(data)
    blob = cache.blob(digest)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    return cache, digest


def test_the_first_open_builds_the_file_and_later_ones_map_it(tmp_path: Path) -> None:
    cache, digest = cached(tmp_path, MANIFEST.encode())
    idx = open_index(cache, digest, name="m")
    assert list(idx) == list(MANIFEST.entries)
    path = cache.manifest_index(digest)
    before = path.stat()
    cache.blob(digest).unlink()  # a later mount does not need the manifest's bytes
    again = open_index(cache, digest, name="m")
    assert list(again) == list(MANIFEST.entries)
    assert path.stat().st_ino == before.st_ino  # mapped, not written again
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_damaged_index_file_is_built_again(tmp_path: Path, damage: str) -> None:
    cache, digest = cached(tmp_path, MANIFEST.encode())
    open_index(cache, digest, name="m")
    path = cache.manifest_index(digest)
    good = path.read_bytes()
    data = bytearray(good)
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-3] ^= 0x40
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert list(open_index(cache, digest, name="m")) == list(MANIFEST.entries)
    assert path.read_bytes() == good


def test_an_invalid_manifest_is_refused_and_no_index_written(tmp_path: Path) -> None:
    data = bytearray(MANIFEST.encode())
    data[-1] ^= 1  # the chunks column: not what the sizes need... or a digest: either way
    data = data[:-5]
    cache, digest = cached(tmp_path, bytes(data))
    with pytest.raises(ManifestError, match=r"^m: "):
        open_index(cache, digest, name="m")
    assert not cache.manifest_index(digest).exists()


def test_a_cache_where_no_index_can_be_written_keeps_it_in_memory(tmp_path: Path) -> None:
    cache, digest = cached(tmp_path, MANIFEST.encode())
    cache.manifest_index(digest).parent.write_text("not a directory")  # mkdir fails
    assert list(open_index(cache, digest, name="m")) == list(MANIFEST.entries)
