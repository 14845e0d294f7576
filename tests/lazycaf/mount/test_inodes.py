"""Tests for lazycaf.mount.inodes: the inode table a mount builds from a manifest."""

from __future__ import annotations

import pytest

from lazycaf.core.digest import Digest
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest
from lazycaf.mount.inodes import ROOT_INODE, InodeTable

CS = 64 << 10


def d(path: str) -> Entry:
    return Entry(path, DIR, 0o755, 1_000, 0)


def f(path: str, content: bytes = b"abc") -> Entry:
    return Entry(path, FILE, 0o644, 2_000, len(content), Digest.of(content))


def sl(path: str, target: str) -> Entry:
    return Entry(path, SYMLINK, 0o777, 3_000, len(target.encode()), target=target)


def hl(path: str, of: Entry) -> Entry:
    return of._replace(path=path, kind=HARDLINK, target=of.path)


F = f("a/f", b"shared")
MANIFEST = Manifest(
    [
        d("a"),
        F,
        d("a/b"),
        f("a/b/g"),
        hl("a/h", F),  # hard links follow their file in path order
        d("c"),
        hl("c/h", F),
        f("top", b"top"),
        sl("link", "top"),
        d("ü"),
        f("ü/ñ.txt", "ñ".encode()),
        f("ü/B"),
        f("ü/a"),
        f("ü/z"),
        f("ü/é"),
    ],
    chunk_size=CS,
    root_mode=0o750,
    root_mtime_ns=42,
)


@pytest.fixture
def table() -> InodeTable:
    return InodeTable(MANIFEST)


def walk(table: InodeTable, path: str) -> int:
    """The inode ``path`` names, by lookups from the root; fails the test when missing."""
    ino = ROOT_INODE
    for part in path.split("/"):
        found = table.lookup(ino, part.encode())
        assert found is not None, path
        ino = found
    return ino


def test_root_is_inode_one_with_the_manifest_root_attributes(table: InodeTable) -> None:
    assert ROOT_INODE == 1
    root = table.entry(ROOT_INODE)
    assert (root.kind, root.mode, root.mtime_ns) == (DIR, 0o750, 42)
    assert table.is_dir(ROOT_INODE)


def test_every_manifest_entry_is_reachable_by_lookup(table: InodeTable) -> None:
    for e in MANIFEST.entries:
        ino = walk(table, e.path)
        target = e.target if e.kind == HARDLINK else e.path
        assert table.entry(ino).path == target


def test_entry_i_of_the_manifest_is_inode_i_plus_2(table: InodeTable) -> None:
    for i, e in enumerate(MANIFEST.entries):
        if e.kind != HARDLINK:
            assert walk(table, e.path) == i + 2


def test_hard_links_share_their_file_inode(table: InodeTable) -> None:
    ino = walk(table, "a/f")
    assert walk(table, "c/h") == ino
    assert walk(table, "a/h") == ino
    assert table.entry(ino).kind == FILE


def test_nlink_of_a_file_is_its_hard_link_group_size(table: InodeTable) -> None:
    assert table.nlink(walk(table, "a/f")) == 3
    assert table.nlink(walk(table, "a/b/g")) == 1
    assert table.nlink(walk(table, "top")) == 1
    assert table.nlink(walk(table, "link")) == 1


def test_nlink_of_a_directory_is_two_plus_its_subdirectories(table: InodeTable) -> None:
    assert table.nlink(ROOT_INODE) == 2 + 3  # a, c, ü
    assert table.nlink(walk(table, "a")) == 2 + 1  # a/b
    assert table.nlink(walk(table, "a/b")) == 2
    assert table.nlink(walk(table, "c")) == 2  # a hard link is not a subdirectory


def test_listing_is_sorted_by_name_bytes(table: InodeTable) -> None:
    names = [name for name, _ in table.listing(walk(table, "ü"))]
    assert names == [b"B", b"a", b"z", "é".encode(), "ñ.txt".encode()]
    assert table.listing(ROOT_INODE) == [
        (b"a", walk(table, "a")),
        (b"c", walk(table, "c")),
        (b"link", walk(table, "link")),
        (b"top", walk(table, "top")),
        ("ü".encode(), walk(table, "ü")),
    ]
    assert table.listing(walk(table, "c")) == [(b"h", walk(table, "a/f"))]


def test_non_ascii_names_are_looked_up_by_their_utf8_bytes(table: InodeTable) -> None:
    ino = walk(table, "ü/ñ.txt")
    assert table.entry(ino).digest == Digest.of("ñ".encode())
    assert table.lookup(walk(table, "ü"), "ñ.txt".encode("latin-1")) is None


@pytest.mark.parametrize("ino", [0, -1, len(MANIFEST.entries) + 2, 10**6])
def test_unknown_inode_raises_key_error(table: InodeTable, ino: int) -> None:
    with pytest.raises(KeyError):
        table.entry(ino)


def test_lookup_misses_return_none(table: InodeTable) -> None:
    assert table.lookup(ROOT_INODE, b"missing") is None
    assert table.lookup(walk(table, "top"), b"x") is None  # a file is not a directory
    assert table.lookup(walk(table, "link"), b"top") is None  # nor is a symlink
    assert table.lookup(10**6, b"a") is None
    assert not table.is_dir(walk(table, "top"))


def test_empty_manifest_has_only_the_root() -> None:
    table = InodeTable(Manifest([], chunk_size=CS))
    assert table.listing(ROOT_INODE) == []
    assert table.nlink(ROOT_INODE) == 2
    with pytest.raises(KeyError):
        table.entry(2)
