"""`lazycaf materialize`: reflinked full trees on Btrfs, copies elsewhere; and `write_tree`
in-process against a hand-made host cache: safe modes, exact sizes, all or nothing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError, Unavailable, UsageError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest
from lazycaf.host.paths import CacheLayout
from lazycaf.trees.materialize import write_tree
from tests.conftest import Host, run_cli
from tests.helpers import make_tree, walk


def exclusive_bytes(path: Path) -> int:
    subprocess.run(["sync"], check=True)
    out = (
        subprocess.run(
            ["btrfs", "filesystem", "du", "-s", "--raw", str(path)],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.splitlines()[-1]
        .split()
    )
    return int(out[1])  # Total, Exclusive, Set shared, Filename


def test_materialize_reflinks_on_btrfs(host: Host, btrfs_dir: Path, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    with open(tree / "lib/big.bin", "wb") as f:
        for _ in range(5):
            f.write(os.urandom(1 << 20))
        f.write(b"tail")
    cas = tmp_path / "cas"
    digest = run_cli("pack", tree, "--cas", cas).stdout.decode().strip()
    target = btrfs_dir / f"mat-{os.getpid()}"
    out = host.cli("materialize", digest, target, "--cas", cas)
    assert b"0 copied" in out.stdout and out.stderr == b""
    try:
        source, copy = walk(tree), walk(target)
        assert sorted(source) == sorted(copy)
        for path, st in source.items():
            c = copy[path]
            assert (c.st_mode, c.st_mtime_ns) == (st.st_mode, st.st_mtime_ns), path
            if os.path.islink(tree / path):
                assert os.readlink(target / path) == os.readlink(tree / path)
            elif os.path.isfile(tree / path):
                assert c.st_nlink == st.st_nlink, path
                assert (target / path).read_bytes() == (tree / path).read_bytes(), path
        # every data extent is shared with the cache: no byte was copied. Btrfs keeps blobs
        # under 2 KiB inline in metadata, which cannot be shared: a small file, or the short
        # last chunk of a big one, may cost one block; nothing else may.
        files = [p for p in source if os.path.isfile(tree / p) and not os.path.islink(tree / p)]
        assert exclusive_bytes(target) <= 4096 * len(files)
        for p in files:
            assert exclusive_bytes(target / p) <= 4096, p
        assert exclusive_bytes(target / "lib/pkg/sub/data.bin") < 3 << 20
        # writing into the copy changes only the copy
        rec = json.loads(run_cli("ls", digest, "bin/tool", "--json", "--cas", cas).stdout)
        blob = host.cache / "blobs" / rec["digest"][:2] / rec["digest"]
        (target / "bin/tool").chmod(0o644)
        with open(target / "bin/tool", "r+b") as f:
            f.write(b"#!/bin/false")
        assert Digest.of(blob.read_bytes()).hex == rec["digest"]
        assert (tree / "bin/tool").read_bytes() != (target / "bin/tool").read_bytes()
        # a second materialize of the same executable shares the same extents
        target2 = btrfs_dir / f"mat2-{os.getpid()}"
        host.cli("materialize", digest, target2, "--cas", cas)
        assert exclusive_bytes(target2 / "lib/big.bin") <= 4096
        subprocess.run(["rm", "-rf", str(target2)], check=True)
        # --copy: the same tree, sharing no extent with the cache, and no note about it
        target3 = btrfs_dir / f"mat3-{os.getpid()}"
        out = host.cli("materialize", digest, target3, "--cas", cas, "--copy")
        assert b" 0 reflinked" in out.stdout and out.stderr == b""
        assert (target3 / "lib/big.bin").read_bytes() == (tree / "lib/big.bin").read_bytes()
        assert exclusive_bytes(target3 / "lib/big.bin") >= 5 << 20
        subprocess.run(["rm", "-rf", str(target3)], check=True)
    finally:
        subprocess.run(["rm", "-rf", str(target)], check=True)


def test_materialize_elsewhere_copies_and_says_so(host: Host, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    digest = run_cli("pack", tree, "--cas", cas).stdout.decode().strip()
    target = tmp_path / "copy"  # not on the cache's Btrfs
    proc = host.cli("materialize", digest, target, "--cas", cas)
    notes = proc.stderr.decode().strip().splitlines()
    assert len(notes) == 1 and "copied, not reflinked" in notes[0]
    assert (target / "lib/pkg/sub/data.bin").read_bytes() == (
        tree / "lib/pkg/sub/data.bin"
    ).read_bytes()
    proc = host.cli("materialize", digest, target, "--cas", cas, check=False)
    assert proc.returncode == 2 and b"not an empty directory" in proc.stderr


# -- write_tree in-process ------------------------------------------------------------------
CHUNK = 64 * 1024
MTIME = 1_600_000_000_123_456_789


def cache_with(root: Path, *blobs: bytes) -> Path:
    """A host cache directory holding ``blobs`` (all ``write_tree`` reads of a cache)."""
    for data in blobs:
        path = CacheLayout(root).blob(Digest.of(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    return root


def file_entry(path: str, data: bytes, mode: int = 0o644, *, size: int | None = None) -> Entry:
    """A file entry for ``data``: chunked above ``CHUNK``; ``size`` may lie about it."""
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] if len(data) > CHUNK else []
    return Entry(
        path,
        FILE,
        mode,
        MTIME,
        len(data) if size is None else size,
        Digest.of(data),
        tuple(map(Digest.of, chunks)),
    )


def unchecked(entries: list[Entry], *, root_mode: int = 0o755) -> Manifest:
    """A Manifest without validation: what a hostile CAS could hand over if the decoder
    let it through (write_tree must not rely on the decoder for its own safety)."""
    m = Manifest.__new__(Manifest)
    m.chunk_size, m.root_mode, m.root_mtime_ns = CHUNK, root_mode, MTIME
    m.entries = tuple(sorted(entries, key=lambda e: e.path))
    return m


def nothing_left(parent: Path, target: Path) -> None:
    """Neither the target nor a temporary sibling exists in ``parent``."""
    assert not os.path.lexists(target)
    assert [p.name for p in parent.iterdir()] == []


def test_write_tree_reproduces_every_kind(tmp_path: Path) -> None:
    small, big = b"#!/bin/sh\necho hi\n", os.urandom(2 * CHUNK + 17)
    cache = cache_with(
        tmp_path / "cache", small, big, *(big[i : i + CHUNK] for i in (0, CHUNK, 2 * CHUNK))
    )
    tool = file_entry("bin/tool", small, 0o755)
    m = Manifest(
        [
            Entry("bin", DIR, 0o755, MTIME + 1, 0),
            tool,
            Entry("bin/link", SYMLINK, 0o777, MTIME + 2, 4, target="tool"),
            tool._replace(path="bin/tool2", kind=HARDLINK, target="bin/tool"),
            file_entry("big", big, 0o600),
            file_entry("empty", b"", 0o444),
        ],
        chunk_size=CHUNK,
        root_mode=0o750,
        root_mtime_ns=MTIME + 3,
    )
    target = tmp_path / "out" / "deep" / "tree"
    res = write_tree(cache, m, target, copy=True)
    assert (res.files, res.bytes, res.reflinked) == (3, len(small) + len(big), 0)
    assert (target / "big").read_bytes() == big and (target / "bin/tool").read_bytes() == small
    assert os.readlink(target / "bin/link") == "tool"
    assert (target / "bin/tool2").stat().st_ino == (target / "bin/tool").stat().st_ino
    for path, mode in (("bin/tool", 0o755), ("big", 0o600), ("empty", 0o444), ("bin", 0o755)):
        assert stat.S_IMODE((target / path).stat().st_mode) == mode, path
    assert (target / "bin").stat().st_mtime_ns == MTIME + 1
    assert (target / "bin/link").lstat().st_mtime_ns == MTIME + 2
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert target.stat().st_mtime_ns == MTIME + 3
    assert [p.name for p in target.parent.iterdir()] == ["tree"]  # no sibling left


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-setid"])
def test_setid_and_world_writable_directories_are_cleared_unless_kept(
    tmp_path: Path, keep: bool
) -> None:
    data = b"\x7fELF pretend"
    cache = cache_with(tmp_path / "cache", data)
    modes = {"suid": 0o4755, "sgid": 0o2711, "both": 0o6777, "dir": 0o2777, "tmpdir": 0o1777}
    entries = [file_entry(name, data, modes[name]) for name in ("suid", "sgid", "both")]
    entries += [Entry(name, DIR, modes[name], MTIME, 0) for name in ("dir", "tmpdir")]
    target = tmp_path / "t"
    write_tree(
        cache, Manifest(entries, chunk_size=CHUNK, root_mode=0o4777), target, keep_setid=keep
    )
    got = {name: stat.S_IMODE((target / name).stat().st_mode) for name in modes}
    root = stat.S_IMODE(target.stat().st_mode)
    if keep:
        assert got == modes and root == 0o4777
    else:
        assert got == {"suid": 0o755, "sgid": 0o711, "both": 0o777, "dir": 0o775, "tmpdir": 0o1775}
        assert root == 0o775


def _sizes(data: bytes) -> list[tuple[str, list[bytes], Entry]]:
    big = os.urandom(CHUNK + 100)
    short_chunk = file_entry("f", big)._replace(
        chunks=(Digest.of(big[:CHUNK]), Digest.of(big[:50]))
    )
    return [
        ("declared larger", [data], file_entry("f", data, size=len(data) + 1)),
        ("declared smaller", [data], file_entry("f", data, size=len(data) - 1)),
        ("declared empty", [data], file_entry("f", data, size=0)),
        ("a short chunk", [big[:CHUNK], big[:50]], short_chunk),
    ]


@pytest.mark.parametrize("copy", [False, True], ids=["reflink-or-copy", "copy"])
@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _sizes(b"xx")])
def test_a_size_the_blob_does_not_have_is_an_integrity_error(
    tmp_path: Path, case: int, copy: bool
) -> None:
    data = os.urandom(1000)
    _, blobs, entry = _sizes(data)[case]
    cache = cache_with(tmp_path / "cache", *blobs)
    (tmp_path / "parent").mkdir()
    target = tmp_path / "parent" / "t"
    with pytest.raises(IntegrityError, match="the manifest says"):
        write_tree(cache, unchecked([entry]), target, copy=copy)
    nothing_left(tmp_path / "parent", target)


def _os_error_cases() -> dict[str, Callable[[Path], tuple[Manifest, Path]]]:
    deep = "/".join(["d" * 200] * 15)  # 3,014 bytes: fine alone, over PATH_MAX under a deep target

    def dirs(path: str) -> list[Entry]:
        parts = path.split("/")
        return [Entry("/".join(parts[: i + 1]), DIR, 0o755, MTIME, 0) for i in range(len(parts))]

    return {
        "name over 255 bytes": lambda t: (unchecked([Entry("n" * 300, DIR, 0o755, MTIME, 0)]), t),
        "symlink target of 5000 bytes": lambda t: (
            unchecked([Entry("l", SYMLINK, 0o777, MTIME, 5000, target="x" * 5000)]),
            t,
        ),
        "path over PATH_MAX": lambda t: (
            unchecked(dirs(deep)),
            t.parent.joinpath("p" * 200, "q" * 200, "r" * 200, "s" * 200, "t" * 200, "tree"),
        ),
        "hard link to nothing": lambda t: (
            unchecked([file_entry("f", b"")._replace(kind=HARDLINK, target="nowhere")]),
            t,
        ),
    }


@pytest.mark.parametrize("case", list(_os_error_cases()))
def test_os_errors_are_one_error_and_leave_nothing(tmp_path: Path, case: str) -> None:
    cache = cache_with(tmp_path / "cache")
    (tmp_path / "parent").mkdir()
    manifest, target = _os_error_cases()[case](tmp_path / "parent" / "new" / "dirs" / "t")
    with pytest.raises(UsageError) as info:
        write_tree(cache, manifest, target)
    assert "\n" not in str(info.value)
    nothing_left(tmp_path / "parent", target)  # the parents it made are gone too


def test_failure_leaves_an_existing_empty_target_as_it_was(tmp_path: Path) -> None:
    data = os.urandom(100)
    cache = cache_with(tmp_path / "cache", data)
    target = tmp_path / "t"
    target.mkdir()
    bad = unchecked([file_entry("a", data), file_entry("b", data, size=99)])
    with pytest.raises(IntegrityError):
        write_tree(cache, bad, target)
    assert [p.name for p in tmp_path.iterdir()] == sorted(["cache", "t"])
    assert list(target.iterdir()) == []
    write_tree(cache, unchecked([file_entry("a", data)]), target)  # an empty target is taken
    assert (target / "a").read_bytes() == data


def test_a_blob_gone_from_the_cache_is_unavailable(tmp_path: Path) -> None:
    cache = cache_with(tmp_path / "cache")
    (tmp_path / "parent").mkdir()
    target = tmp_path / "parent" / "t"
    with pytest.raises(Unavailable, match="left the host cache"):
        write_tree(cache, unchecked([file_entry("a", b"never cached")]), target)
    nothing_left(tmp_path / "parent", target)


class StopAfter(threading.Event):
    """An event that reads as set from its ``n``-th look on (a signal mid-build)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.looks, self.n = 0, n

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


def test_stop_removes_the_partial_tree(tmp_path: Path) -> None:
    cache = cache_with(tmp_path / "cache", b"")
    m = unchecked([file_entry(f"f{i:03}", b"") for i in range(100)])
    (tmp_path / "parent").mkdir()
    target = tmp_path / "parent" / "t"
    stop = StopAfter(50)
    with pytest.raises(KeyboardInterrupt):
        write_tree(cache, m, target, stop=stop)
    assert stop.looks == 50  # it did stop half-way, with files written
    nothing_left(tmp_path / "parent", target)
