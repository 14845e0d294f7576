"""Tests for lazycaf.core.manifestindex: the index answers exactly what the decoded manifest
says, refuses what the decoder refuses, and refuses a buffer that is not its index."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lazycaf.core.digest import Digest
from lazycaf.core.errors import ManifestError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest
from lazycaf.core.manifestindex import ROOT_INODE, ManifestIndex, build_index
from tests.faults.hostile import cases

CS = 64 << 10
CASES = cases(Path("/nonexistent-lazycaf-outside"))


def d(path: str) -> Entry:
    return Entry(path, DIR, 0o750, 1_000, 0)


def f(path: str, content: bytes = b"abc", mode: int = 0o644) -> Entry:
    return Entry(path, FILE, mode, 2_000, len(content), Digest.of(content))


def big(path: str, chunks: int) -> Entry:
    tags = tuple(Digest.of(f"{path}#{i}".encode()) for i in range(chunks))
    size = (chunks - 1) * CS + 7
    return Entry(path, FILE, 0o600, 3_000, size, Digest.of(path.encode()), tags)


def hl(path: str, of: Entry) -> Entry:
    return of._replace(path=path, kind=HARDLINK, target=of.path)


def sl(path: str, target: str) -> Entry:
    return Entry(path, SYMLINK, 0o777, 4_000, len(target.encode()), target=target)


B = big("a/big", 3)
F = f("a/f", b"shared")
MANIFEST = Manifest(
    [
        d("a"),
        F,
        B,
        d("a/b"),
        f("a/b/g", b""),
        hl("a/h", F),
        hl("a/hb", B),
        d("a-b"),
        f("a-b/x"),
        d("c"),
        hl("c/h", F),
        sl("link", "a/f"),
        d("ü"),
        f("ü/ñ.txt", "ñ".encode()),
        f("ü/B"),
        f("ü/a"),
    ],
    chunk_size=CS,
    root_mode=0o711,
    root_mtime_ns=42,
)


def random_manifest(rng: random.Random, n: int) -> Manifest:
    entries: list[Entry] = []
    dirs = [""]
    files: list[Entry] = []
    names = ["a", "b", "a-b", "a.b", "z", "é", "ab", "a b", "0"]
    while len(entries) < n:
        parent = rng.choice(dirs)
        name = rng.choice(names) + str(rng.randrange(20))
        path = f"{parent}/{name}" if parent else name
        if any(e.path == path for e in entries):
            continue
        roll = rng.random()
        if roll < 0.25:
            entries.append(d(path))
            dirs.append(path)
        elif roll < 0.35:
            entries.append(sl(path, rng.choice(names)))
        elif roll < 0.45 and files:
            of = rng.choice(files)
            if of.path < path:
                entries.append(hl(path, of))
        elif roll < 0.5:
            e = big(path, rng.randrange(2, 5))
            entries.append(e)
            files.append(e)
        else:
            e = f(path, rng.choice((b"", b"x", b"yy", path.encode())))
            entries.append(e)
            files.append(e)
    return Manifest(entries, chunk_size=CS)


def expected_children(m: Manifest) -> dict[int, list[tuple[bytes, int]]]:
    """What the old table held: (name, inode) per directory inode, sorted by name bytes."""
    inode = {e.path: i + 2 for i, e in enumerate(m.entries)}
    inode[""] = ROOT_INODE
    out: dict[int, list[tuple[bytes, int]]] = {ROOT_INODE: []}
    for i, e in enumerate(m.entries):
        if e.kind == DIR:
            out[i + 2] = []
    for e in m.entries:
        parent, _, name = e.path.rpartition("/")
        target = inode[e.target or ""] if e.kind == HARDLINK else inode[e.path]
        out[inode[parent]].append((name.encode(), target))
    return {k: sorted(v) for k, v in out.items()}


def check_same(m: Manifest) -> ManifestIndex:
    idx = ManifestIndex.build(m.encode())
    assert list(idx) == list(m.entries)
    assert (idx.chunk_size, idx.root_mode, idx.root_mtime_ns) == (
        m.chunk_size,
        m.root_mode,
        m.root_mtime_ns,
    )
    for i, e in enumerate(m.entries):
        assert idx.get(e.path) == e and idx.find(e.path) == i
        assert idx.by_path[e.path] == e
        assert idx.stat(i) == (e.st_mode, e.size, e.mtime_ns)
    assert idx.get("nope/x") is None and "nope" not in idx.by_path
    for ino, listing in expected_children(m).items():
        assert idx.is_dir(ino)
        got = [
            (idx.name(idx.child(ino, p)), idx.inode_of(idx.child(ino, p)))
            for p in range(idx.child_count(ino))
        ]
        assert got == listing
        for name, target in listing:
            assert idx.lookup(ino, name) == target
        assert idx.lookup(ino, b"\xff-absent") is None
        subdirs = sum(1 for _, t in listing if t >= 2 and m.entries[t - 2].kind == DIR)
        assert idx.nlink(ino) == 2 + subdirs
    for i, e in enumerate(m.entries):
        if e.kind == FILE:
            links = sum(1 for h in m.entries if h.kind == HARDLINK and h.target == e.path)
            assert idx.nlink(i + 2) == 1 + links
    assert idx.blobs() == m.blobs()
    assert idx.blob_bytes() == sum(m.blobs().values())
    assert idx.file_bytes() == m.total_bytes()
    return idx


def test_the_index_answers_what_the_manifest_says() -> None:
    idx = check_same(MANIFEST)
    assert idx.nlink(ROOT_INODE) == 2 + 4  # a, a-b, c, ü
    assert idx.lookup(ROOT_INODE, "ü".encode()) == MANIFEST.entries.index(d("ü")) + 2
    f_ino = idx.find("a/f")
    assert f_ino is not None and idx.lookup(idx.find("c") + 2, b"h") == f_ino + 2  # type: ignore[operator]


@pytest.mark.parametrize("seed", range(12))
def test_random_trees_index_like_they_decode(seed: int) -> None:
    check_same(random_manifest(random.Random(seed), 60))


def test_an_empty_tree() -> None:
    idx = check_same(Manifest([], chunk_size=CS))
    assert idx.child_count(ROOT_INODE) == 0 and idx.nlink(ROOT_INODE) == 2


def test_files_by_digest_finds_only_what_is_asked() -> None:
    idx = ManifestIndex.build(MANIFEST.encode())
    got = idx.files_by_digest({F.digest.raw, b"\0" * 32})  # type: ignore[union-attr]
    assert got == {F.digest.hex: F}  # type: ignore[union-attr]
    assert idx.files_by_digest(set()) == {}


def test_a_buffer_that_is_not_this_index_is_refused() -> None:
    data = MANIFEST.encode()
    digest = Digest.of(data)
    built = build_index(data, digest=digest)
    ManifestIndex(built, digest=digest)
    with pytest.raises(ManifestError, match="another manifest"):
        ManifestIndex(built, digest=Digest.of(b"other"))
    flipped = bytearray(built)
    flipped[-1] ^= 1
    with pytest.raises(ManifestError, match="checksum"):
        ManifestIndex(bytes(flipped), digest=digest)
    for cut in (0, 10, len(built) // 2, len(built) - 1):
        with pytest.raises(ManifestError):
            ManifestIndex(built[:cut], digest=digest)
    with pytest.raises(ManifestError, match="not a version 1 index"):
        ManifestIndex(b"X" + built[1:], digest=digest)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_index_refuses_what_the_decoder_refuses(case: object) -> None:
    data: bytes = case.data  # type: ignore[attr-defined]
    try:
        m = Manifest.decode(data, name="m")
    except ManifestError as exc:
        with pytest.raises(ManifestError) as info:
            build_index(data, digest=Digest.of(data), name="m")
        assert str(info.value) == str(exc)
        return
    assert list(ManifestIndex.build(data)) == list(m.entries)
