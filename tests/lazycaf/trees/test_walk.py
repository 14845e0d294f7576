"""Tests for lazycaf.trees.walk: a tree's entries as columns in manifest order, the stat
cache asked a directory at a time."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lazycaf.cas.local import LocalCAS
from lazycaf.core.digest import Digest
from lazycaf.core.errors import PackError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK
from lazycaf.trees import walk as walkmod
from lazycaf.trees.pack import pack
from lazycaf.trees.statcache import StatCache
from lazycaf.trees.walk import walk_tree

CS = 64 << 10
OLD_NS = 1_600_000_000 * 10**9  # far from racy: the stat cache trusts these files


def old_tree(root: Path, dirs: int = 3, files: int = 5) -> Path:
    for d in range(dirs):
        for f in range(files):
            p = root / f"d{d}" / f"m{f}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"# {d} {f}\n")
            os.utime(p, ns=(OLD_NS, OLD_NS))
    return root


class Counting(StatCache):
    """Counts the stat cache's answers: runs (a directory at once) and single files."""

    runs = 0
    singles = 0

    def find_run(self, paths: list[str], keys: bytes, newest_mtime_ns: int) -> int | None:
        found = super().find_run(paths, keys, newest_mtime_ns)
        self.runs += found is not None
        return found

    def find(self, rel: str, key: tuple[int, int, int, int, int]) -> int | None:
        self.singles += 1
        return super().find(rel, key)


def check_found(root: Path, walked_paths: list[str], found: list[int], cache: StatCache) -> None:
    for path, at in zip(walked_paths, found, strict=True):
        if at >= 0:
            assert cache.raw_digest(at) == Digest.of((root / path).read_bytes()).raw, path


async def test_an_unchanged_directory_is_one_run_an_edited_one_file_by_file(
    tmp_path: Path,
) -> None:
    tree = old_tree(tmp_path / "t")
    state = tmp_path / "state"
    await pack(tree, LocalCAS(tmp_path / "cas"), chunk_size=CS, stat_cache_dir=state)
    (tree / "d1" / "m2.py").write_text("# edited\n")
    cache = Counting(StatCache.for_tree(state, tree, CS).path)
    walked = walk_tree(tree, statcache=cache)
    assert (cache.runs, cache.singles, cache.hits) == (2, 5, 14)
    assert [walked.paths[i] for i in walked.unvouched] == ["d1/m2.py"]
    check_found(tree, walked.paths, list(walked.found), cache)
    # a file added: its directory's run no longer matches, the others' still do
    (tree / "d2" / "m9.py").write_text("new\n")
    cache = Counting(StatCache.for_tree(state, tree, CS).path)
    walked = walk_tree(tree, statcache=cache)
    assert (cache.runs, cache.hits) == (1, 5 + 4 + 5)  # d0 a run; d1 and d2 file by file
    assert sorted(walked.paths[i] for i in walked.unvouched) == ["d1/m2.py", "d2/m9.py"]
    check_found(tree, walked.paths, list(walked.found), cache)


async def test_runs_are_saved_so_the_next_walk_finds_each_at_the_next_position(
    tmp_path: Path,
) -> None:
    """After a re-pack that edited a file, the saved records are in the walk's order again:
    the next walk matches every directory as a run without a dict of the paths."""
    tree = old_tree(tmp_path / "t")
    state = tmp_path / "state"
    cas = LocalCAS(tmp_path / "cas")
    await pack(tree, cas, chunk_size=CS, stat_cache_dir=state)
    edited = tree / "d0" / "m4.py"
    edited.write_text("# edited\n")
    os.utime(edited, ns=(OLD_NS + 1, OLD_NS + 1))
    await pack(tree, cas, chunk_size=CS, stat_cache_dir=state)
    cache = Counting(StatCache.for_tree(state, tree, CS).path)
    walked = walk_tree(tree, statcache=cache)
    assert (cache.runs, cache.singles, cache.hits) == (3, 0, 15)
    assert cache._index is None  # never jumped
    check_found(tree, walked.paths, list(walked.found), cache)


async def test_a_racy_file_is_hashed_again_its_directory_asked_file_by_file(
    tmp_path: Path,
) -> None:
    """A file modified within the racy window of the cache's save may have changed in the
    same timestamp tick: the run of its directory does not match, the file is not vouched
    for, its siblings are."""
    tree = old_tree(tmp_path / "t")
    racy = tree / "d1" / "m3.py"
    now = time.time_ns()
    os.utime(racy, ns=(now, now))
    state = tmp_path / "state"
    await pack(tree, LocalCAS(tmp_path / "cas"), chunk_size=CS, stat_cache_dir=state)
    cache = Counting(StatCache.for_tree(state, tree, CS).path)
    walked = walk_tree(tree, statcache=cache)
    assert (cache.runs, cache.singles, cache.hits) == (2, 5, 14)
    assert [walked.paths[i] for i in walked.unvouched] == ["d1/m3.py"]
    check_found(tree, walked.paths, list(walked.found), cache)


def test_columns_hold_each_kind_as_the_manifest_does(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "a.so").write_bytes(b"x" * 100)
    os.link(tree / "lib" / "a.so", tree / "lib" / "b.so")
    os.symlink("a.so", tree / "lib" / "c.so")
    (tree / "run").write_text("#!/bin/sh\n")
    (tree / "run").chmod(0o4755)  # setuid: dropped unless kept
    (tree / "empty").mkdir()
    walked = walk_tree(tree)
    rows = list(zip(walked.paths, walked.kinds, walked.modes, walked.sizes, strict=True))
    assert rows == [
        ("empty", DIR, 0o755, 0),
        ("lib", DIR, 0o755, 0),
        ("lib/a.so", FILE, 0o644, 100),
        ("lib/b.so", HARDLINK, 0, 0),
        ("lib/c.so", SYMLINK, 0, 4),
        ("run", FILE, 0o755, 10),
    ]
    assert walked.targets == ["lib/a.so", "a.so"]
    assert walk_tree(tree, keep_setid=True).modes[-1] == 0o4755
    assert walked.mtimes[3] == 0 and list(walked.found) == [-1] * 6


def test_a_path_as_long_as_a_manifest_holds_walks_below_an_open_root(tmp_path: Path) -> None:
    """Directories are opened relative to the root's descriptor: a path of 4,017 bytes
    below a root whose own path is longer than the rest of PATH_MAX walks; one of 4,096
    bytes is refused naming its length."""
    tree = tmp_path / "t"
    tree.mkdir()
    name = "n" * 250
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(16):  # by descriptor: the whole path is past what a syscall takes
            os.mkdir(name, dir_fd=fd)
            fd, parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        walked = walk_tree(tree)
        deep = "/".join([name] * 16)
        assert walked.paths[-1] == f"{deep}/f" and len(walked.paths[-1]) == 4017
        assert walked.kinds == [DIR] * 16 + [FILE]
        os.close(os.open("x" * 80, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))  # 4,096 bytes
        with pytest.raises(PackError, match=r"is 4096 bytes long \(a manifest holds at most 4095"):
            walk_tree(tree)
    finally:
        os.close(fd)


def test_a_directory_swapped_for_a_link_while_walking_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``a`` is listed, then swapped for a symlink to a tree outside before ``a/b`` is
    opened (by its path below the root: ``O_NOFOLLOW`` guards only ``b``): the walk sees that
    ``a/b`` is not the directory ``a`` listed and stops, packing nothing from outside."""
    tree = tmp_path / "t"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("inside")
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    (outside / "b" / "SECRET").write_text("outside")
    original = walkmod._Reader.read

    def read(self: walkmod._Reader, rel: str, listed: tuple[int, int]) -> object:
        listing = original(self, rel, listed)
        if rel == "a":
            os.rename(tree / "a", tmp_path / "a-away")
            os.symlink(outside, tree / "a")
        return listing

    monkeypatch.setattr(walkmod._Reader, "read", read)
    with pytest.raises(PackError, match=r"t/a/b: it was replaced while packing"):
        walk_tree(tree)


def test_an_mtime_a_manifest_cannot_hold_is_one_line_naming_the_file(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "future").write_text("x")
    os.utime(tree / "future", ns=(0, 2**63 + 10**18))  # the year 2293: ext4 holds it
    assert os.stat(tree / "future").st_mtime_ns > 2**63 - 1
    with pytest.raises(PackError, match=r"t/future: its mtime is outside what a manifest holds"):
        walk_tree(tree)


def test_a_file_or_directory_replaced_after_the_walk_is_never_read_through(
    tmp_path: Path,
) -> None:
    """Between the walk and the hashing, a directory of the tree swapped for a symlink to
    elsewhere (holding a file of the same name and size), or a file swapped for a symlink or
    a FIFO: the pack stops with one line and never reads the bytes it would reach."""
    from lazycaf.trees.pack import hash_batch

    root = tmp_path / "tree"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg/a.py").write_text("inside\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.py").write_text("secret\n")  # same size: only the inode tells them apart

    def files() -> list[walkmod.Scanned]:
        walked = walk_tree(root)
        return [walked.scanned(i) for i, k in enumerate(walked.kinds) if k == FILE]

    seen = files()
    ((hashes, _),) = hash_batch(str(root), seen, CS)
    assert hashes[0] == Digest.of(b"inside\n")

    (root / "pkg").rename(tmp_path / "moved")
    os.symlink(outside, root / "pkg")
    with pytest.raises(PackError, match=r"pkg/a.py changed while packing \(not the file"):
        hash_batch(str(root), seen, CS)
    os.unlink(root / "pkg")
    (tmp_path / "moved").rename(root / "pkg")

    seen = files()
    os.unlink(root / "pkg/a.py")
    os.symlink(outside / "a.py", root / "pkg/a.py")
    with pytest.raises(PackError, match=r"changed while packing \(now a symlink\)"):
        hash_batch(str(root), seen, CS)
    os.unlink(root / "pkg/a.py")
    os.mkfifo(root / "pkg/a.py")  # no writer: a plain open would block forever
    with pytest.raises(PackError, match="changed while packing"):
        hash_batch(str(root), seen, CS)
