"""scripts/seedtree.py at a small scale: deterministic, its next build differs exactly in the
intended files, a fresh copy of the next build uploads only the changed blobs, and the mounted
tree equals the source (the correctness part of issue 16's "Done when"; timings are
``scripts/bench_seed.py``'s, never asserted here)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from lazycaf.core.chunking import DEFAULT_CHUNK_SIZE, chunk_spans
from lazycaf.core.digest import Digest
from scripts import seedtree
from tests.conftest import Host, run_cli

SCALE = 0.001


def snapshot(root: Path) -> dict[str, tuple[str, str]]:
    """path -> (kind, sha256 of the bytes or the link text); hard links as ``hardlink:N``
    groups, so two trees compare by shape, contents and links, not by inode numbers."""
    out: dict[str, tuple[str, str]] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", "")
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                group = inodes.setdefault((st.st_dev, st.st_ino), rel) if st.st_nlink > 1 else ""
                out[rel] = ("file", f"{digest} {group}".strip())
    return out


def blobs_of(path: Path) -> set[str]:
    """The blob digests ``lazycaf pack`` stores for one file (one, or one per chunk)."""
    data = path.read_bytes()
    spans = chunk_spans(len(data), DEFAULT_CHUNK_SIZE)
    return {Digest.of(data[off : off + n]).hex for off, n in spans}


def cas_blobs(cas: Path) -> set[str]:
    return {name.removesuffix(".zst") for _, _, names in os.walk(cas / "blobs") for name in names}


def pack(tree: Path, cas: Path, state: Path) -> str:
    out = run_cli("pack", tree, "--cas", cas, env={"LAZYCAF_STATE": str(state)})
    return out.stdout.decode().strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("seed")
    seedtree.write_tree(base / "v1", scale=SCALE)
    seedtree.write_tree(base / "v2", scale=SCALE, version=2)
    return base / "v1", base / "v2"


def test_generator_is_deterministic(trees: tuple[Path, Path], tmp_path: Path) -> None:
    v1, _ = trees
    again = seedtree.write_tree(tmp_path / "again", scale=SCALE)
    assert snapshot(tmp_path / "again") == snapshot(v1)
    assert again.counts[seedtree.SYMLINK] >= 2 and again.counts[seedtree.LIB] >= 5


def test_shape_has_every_kind_and_no_degenerate_bytes(trees: tuple[Path, Path]) -> None:
    v1, _ = trees
    libs = [p for p in v1.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    assert libs and all(p.read_bytes()[:4] == b"\x7fELF" for p in libs)
    biggest = max(libs, key=lambda p: p.stat().st_size).read_bytes()
    assert len(set(biggest[:65536])) > 200  # neither zeros nor a short repeated pattern
    pycs = list(v1.rglob("*.pyc"))
    assert pycs and all(p.read_bytes()[:4] == seedtree.PYC_MAGIC for p in pycs)
    full = seedtree.plan(1.0)
    assert 280_000 <= len(full) <= 320_000  # directories come on top
    assert 17e9 <= sum(it.size for it in full) <= 23e9


def test_v2_differs_exactly_in_the_changed_files(trees: tuple[Path, Path]) -> None:
    v1, v2 = trees
    a, b = snapshot(v1), snapshot(v2)
    assert a.keys() == b.keys()
    differ = sorted(p for p in a if a[p] != b[p])
    changed = seedtree.changed_paths(SCALE)
    assert differ == sorted(changed)
    assert len(changed) == 2 * seedtree.CHANGED_PY + 1


def test_fresh_v2_uploads_only_the_changed_blobs(trees: tuple[Path, Path], tmp_path: Path) -> None:
    v1, v2 = trees
    cas, state = tmp_path / "cas", tmp_path / "state"
    pack(v1, cas, state)
    before = cas_blobs(cas)
    manifest = pack(v2, cas, state)
    new = cas_blobs(cas) - before
    expected = set().union(*(blobs_of(v2 / p) for p in seedtree.changed_paths(SCALE)))
    assert new - {manifest} == expected - before
    assert len(expected - before) >= 2 * seedtree.CHANGED_PY  # each changed file is new


def test_mounted_tree_equals_the_source(
    trees: tuple[Path, Path], host: Host, tmp_path: Path
) -> None:
    v1, _ = trees
    cas = tmp_path / "cas"
    ref = pack(v1, cas, tmp_path / "state")
    mnt = host.mountpoint()
    host.cli("mount", ref, mnt, "--cas", cas)
    try:
        mounted = snapshot(mnt)
    finally:
        host.cli("umount", mnt)
    source = snapshot(v1)
    assert {p: k for p, (k, _) in mounted.items()} == {p: k for p, (k, _) in source.items()}
    strip = {p: (k, v.split(" ")[0]) for p, (k, v) in source.items()}
    assert {p: (k, v.split(" ")[0]) for p, (k, v) in mounted.items()} == strip
