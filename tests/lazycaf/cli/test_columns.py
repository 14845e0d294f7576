"""Tests for lazycaf.cli.columns: ``ls`` lines and diffs from a manifest's columns are
exactly what the entry-by-entry read-outs (``format_ls``, ``entry_json``, the old diff)
give, on hand-made and random trees."""

from __future__ import annotations

import random

import pytest

from lazycaf.cli.columns import Columns, ls_lines
from lazycaf.cli.readouts import (
    Change,
    Diff,
    _changed_bytes,
    _what_changed,
    diff_manifests,
    entry_json,
    format_ls,
    link_counts,
)
from lazycaf.core.digest import Digest
from lazycaf.core.errors import PathNotFound
from lazycaf.core.manifest import FILE, HARDLINK, Entry, Manifest, decode_columns
from tests.lazycaf.core.test_manifestindex import MANIFEST, random_manifest

CS = 64 << 10


def cols(m: Manifest) -> Columns:
    return Columns(decode_columns(m.encode()))


def reference_ls(m: Manifest, path: str, recursive: bool, as_json: bool) -> list[str]:
    """What ``lazycaf ls`` printed before columns (lazycaf/cli/store.py, entry by entry)."""
    path = path.strip("/")
    nlinks = link_counts(m)
    entry = m.get(path) if path else None
    by_name = False
    if entry is not None and entry.kind != "d":
        shown = [entry]
    elif recursive:
        prefix = path + "/" if path else ""
        shown = [e for e in m.entries if e.path.startswith(prefix)]
    else:
        shown, by_name = m.children(path), True
    out = []
    for e in shown:
        n = nlinks[e.path]
        name = e.path.rpartition("/")[2] if by_name else e.path
        out.append(entry_json(e, n) if as_json else format_ls(e, n, name))
    return out


def reference_diff(a: Manifest, b: Manifest) -> Diff:
    """The diff as it was computed entry by entry (by_path dicts, ``Manifest.blobs``)."""
    pa, pb = a.by_path, b.by_path
    added = [e for p, e in pb.items() if p not in pa]
    removed = [e for p, e in pa.items() if p not in pb]
    changed = []
    for p, eb in pb.items():
        ea = pa.get(p)
        if ea is None or ea == eb:
            continue
        what = _what_changed(ea, eb, b.chunk_size)
        if what:
            content_of = eb.target if eb.kind == HARDLINK and eb.target else p
            changed.append(Change(p, what, _changed_bytes(ea, eb, b.chunk_size), content_of))
    blobs_a = a.blobs()
    new_blob_bytes = sum(size for d, size in b.blobs().items() if d not in blobs_a)
    return Diff(added, removed, changed, new_blob_bytes)


def listings(m: Manifest) -> list[tuple[str, bool, bool]]:
    paths = ["", "/", "a", "a/", "ü", "link", "a/f", "c", *(e.path for e in m.entries[:20])]
    return [(p, r, j) for p in paths for r in (False, True) for j in (False, True)]


@pytest.mark.parametrize(
    "m", [MANIFEST, *(random_manifest(random.Random(s), 80) for s in range(6))]
)
def test_ls_lines_are_the_entry_by_entry_lines(m: Manifest) -> None:
    c = cols(m)
    for path, recursive, as_json in listings(m):
        if path.strip("/") and m.get(path) is None:
            with pytest.raises(PathNotFound):
                list(ls_lines(c, path, recursive=recursive, as_json=as_json, digest="x"))
            continue
        got = list(ls_lines(c, path, recursive=recursive, as_json=as_json, digest="x"))
        assert got == reference_ls(m, path, recursive, as_json), (path, recursive, as_json)


def mutate(rng: random.Random, m: Manifest) -> Manifest:
    """``m`` with a few files changed (content, mode, mtime), removed or added."""
    entries = list(m.entries)
    linked = {e.target for e in entries if e.kind == HARDLINK}
    for _ in range(rng.randrange(1, 5)):
        i = rng.randrange(len(entries))
        e = entries[i]
        if e.kind != FILE or e.path in linked:
            continue
        roll = rng.random()
        if roll < 0.3:
            content = rng.choice((b"", b"new", e.path.encode() + b"!"))
            entries[i] = e._replace(digest=Digest.of(content), size=len(content), chunks=())
        elif roll < 0.5:
            entries[i] = e._replace(mode=0o600 if e.mode != 0o600 else 0o644)
        elif roll < 0.7:
            entries[i] = e._replace(mtime_ns=e.mtime_ns + 1)
        elif roll < 0.85:
            del entries[i]
        else:
            entries.append(Entry(e.path + "-new", FILE, 0o644, 5, 4, Digest.of(b"more")))
    return Manifest(entries, chunk_size=m.chunk_size)


@pytest.mark.parametrize("seed", range(30))
def test_diffs_are_the_entry_by_entry_diffs(seed: int) -> None:
    rng = random.Random(seed)
    a = random_manifest(rng, 60)
    b = mutate(rng, a)
    for x, y in ((a, b), (b, a), (a, a)):
        got, want = diff_manifests(x, y), reference_diff(x, y)
        assert got.lines() == want.lines()
        assert got.to_json() == want.to_json()


def test_diff_of_same_paths_with_a_chunked_file_changed() -> None:
    a = MANIFEST
    entries = list(a.entries)
    i = next(k for k, e in enumerate(entries) if e.path == "a/big")
    e = entries[i]
    new_chunk = Digest.of(b"other chunk")
    entries[i] = e._replace(chunks=(e.chunks[0], new_chunk, *e.chunks[2:]), digest=Digest.of(b"v2"))
    entries = [
        x._replace(chunks=entries[i].chunks, digest=entries[i].digest)
        if x.kind == HARDLINK and x.target == "a/big"
        else x
        for x in entries
    ]
    b = Manifest(entries, chunk_size=a.chunk_size)
    got, want = diff_manifests(a, b), reference_diff(a, b)
    assert got.to_json() == want.to_json() and got.new_blob_bytes == CS


@pytest.mark.parametrize("seed", range(30))
def test_diffs_without_hard_links_compare_whole_columns(seed: int) -> None:
    """No hard links and the same paths: the column-by-column path of the diff."""
    rng = random.Random(seed)
    full = random_manifest(rng, 60)
    a = Manifest([e for e in full.entries if e.kind != HARDLINK], chunk_size=CS)
    linked = {e.target for e in a.entries if e.kind == HARDLINK}
    assert not linked
    entries = list(a.entries)
    for _ in range(3):
        i = rng.randrange(len(entries))
        e = entries[i]
        if e.kind == FILE:
            content = rng.choice((b"", b"z", e.path.encode()))
            entries[i] = e._replace(digest=Digest.of(content), size=len(content), chunks=())
        else:
            entries[i] = e._replace(mtime_ns=e.mtime_ns + 7)
    b = Manifest(entries, chunk_size=CS)
    for x, y in ((a, b), (b, a)):
        got, want = diff_manifests(x, y), reference_diff(x, y)
        assert got.to_json() == want.to_json()


@pytest.mark.parametrize("seed", range(20))
def test_diff_without_mtimes_counts_the_mtime_only_changes(seed: int) -> None:
    """``diff`` without ``--mtimes``: the reference diff less the changes that are only an
    mtime, which are counted instead (both column paths: same paths, and not)."""
    rng = random.Random(seed)
    a = random_manifest(rng, 60)
    b = mutate(rng, a)
    fresh = Manifest(
        [e._replace(mtime_ns=e.mtime_ns + 1) for e in a.entries],  # links carry their file's
        chunk_size=a.chunk_size,
    )
    for x, y in ((a, b), (b, a), (a, fresh)):
        got, want = diff_manifests(x, y, mtimes=False), reference_diff(x, y)
        only = [c for c in want.changed if c.what == ("mtime",)]
        assert got.mtime_only == len(only)
        assert got.changed == [c for c in want.changed if c.what != ("mtime",)]
        assert (got.added, got.removed) == (want.added, want.removed)
        assert got.new_blob_bytes == want.new_blob_bytes
