"""Tests for lazycaf.cli.readouts: link counts, ``ls -l`` lines, JSON entries and manifest diffs."""

from __future__ import annotations

import json

import pytest

from lazycaf.cli.readouts import diff_manifests, entry_json, format_ls, link_counts
from lazycaf.core.chunking import chunk_count
from lazycaf.core.digest import Digest
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest

CS = 64 << 10


def D(tag: str) -> Digest:
    return Digest.of(tag.encode())


def d(path: str, mode: int = 0o755, mtime: int = 0) -> Entry:
    return Entry(path, DIR, mode, mtime, 0)


def f(
    path: str,
    size: int = 3,
    *,
    tag: str | None = None,
    mode: int = 0o644,
    mtime: int = 0,
    chunk_tags: list[str] | None = None,
) -> Entry:
    tag = tag or path
    n = chunk_count(size, CS)
    tags = chunk_tags if chunk_tags is not None else [f"{tag}#{i}" for i in range(n)]
    assert len(tags) == n
    digest = D(tag) if size else Digest.of(b"")  # size 0: the empty blob's digest
    return Entry(path, FILE, mode, mtime, size, digest, tuple(D(t) for t in tags))


def sl(path: str, target: str, mtime: int = 0) -> Entry:
    return Entry(path, SYMLINK, 0o777, mtime, len(target.encode()), target=target)


def hl(path: str, of: Entry) -> Entry:
    return of._replace(path=path, kind=HARDLINK, target=of.path)


def man(*entries: Entry) -> Manifest:
    return Manifest(entries, chunk_size=CS)


# -- link_counts -----------------------------------------------------------------------------
def test_link_counts() -> None:
    f1 = f("f1")
    deep = f("a/b/x", 5)
    m = man(
        d("a"),
        d("a/b"),
        d("a/b/d"),
        d("a/c"),
        hl("a/c/deep-link", deep),
        deep,
        f1,
        hl("h1", f1),
        hl("h2", f1),
        f("solo"),
        sl("s", "f1"),
        d("z"),
    )
    counts = link_counts(m)
    assert counts == {
        "": 2 + 2,  # subdirectories a and z
        "a": 2 + 2,  # b and c
        "a/b": 2 + 1,  # d
        "a/b/d": 2,
        "a/c": 2,
        "a/b/x": 2,
        "a/c/deep-link": 2,
        "f1": 3,
        "h1": 3,
        "h2": 3,
        "solo": 1,
        "s": 1,
        "z": 2,
    }


def test_link_counts_of_a_tree_without_directories() -> None:
    assert link_counts(man(f("x"))) == {"": 2, "x": 1}


# -- format_ls -------------------------------------------------------------------------------
T = 1_700_000_000_123_456_789
T_TEXT = "2023-11-14 22:13:20.123456789"


@pytest.mark.parametrize(
    ("entry", "nlink", "line"),
    [
        (d("dir", 0o755, T), 4, f"drwxr-xr-x   4            0 {T_TEXT} dir"),
        (d("tmp", 0o1777, T), 2, f"drwxrwxrwt   2            0 {T_TEXT} tmp"),
        (f("bin", 123456, mode=0o4755, mtime=T), 1, f"-rwsr-xr-x   1       123456 {T_TEXT} bin"),
        (
            f("ro", 0, mode=0o400, mtime=0),
            1,
            "-r--------   1            0 1970-01-01 00:00:00.000000000 ro",
        ),
        (
            f("old", 1, mode=0o644, mtime=-1),
            1,
            "-rw-r--r--   1            1 1969-12-31 23:59:59.999999999 old",
        ),
        (sl("lnk", "../target", T), 1, f"lrwxrwxrwx   1            9 {T_TEXT} lnk -> ../target"),
        (
            hl("hard", f("orig", 42, mode=0o640, mtime=T)),
            2,
            f"-rw-r-----   2           42 {T_TEXT} hard",
        ),
    ],
    ids=["dir", "sticky", "setuid", "readonly", "pre-epoch", "symlink", "hardlink"],
)
def test_format_ls(entry: Entry, nlink: int, line: str) -> None:
    assert format_ls(entry, nlink) == line


def test_format_ls_name_override_keeps_symlink_arrow() -> None:
    e = sl("deep/dir/lnk", "tgt")
    assert format_ls(e, 1, name="lnk").endswith(" lnk -> tgt")
    assert format_ls(f("deep/x"), 1, name="x").endswith(" x")
    assert " deep/x" in format_ls(f("deep/x"), 1)


def test_format_ls_big_sizes_and_counts_stay_aligned() -> None:
    line = format_ls(Entry("huge", FILE, 0o644, 0, 10**12, D("huge")), 1000)
    assert line.startswith("-rw-r--r-- 1000 1000000000000 ")


# -- entry_json ------------------------------------------------------------------------------
def test_entry_json() -> None:
    big = f("big", 2 * CS + 1)
    records = {
        e.path: json.loads(entry_json(e, n))
        for e, n in [(d("dir"), 2), (big, 2), (hl("hl", big), 2), (sl("sl", "big"), 1)]
    }
    assert records["dir"] == {
        "path": "dir",
        "kind": "dir",
        "mode": 0o755,
        "mtime_ns": 0,
        "size": 0,
        "nlink": 2,
    }
    assert records["big"]["kind"] == "file"
    assert records["big"]["digest"] == D("big").hex
    assert records["big"]["chunks"] == 3
    assert records["hl"]["kind"] == "hardlink"
    assert records["hl"]["target"] == "big"
    assert records["hl"]["digest"] == D("big").hex
    assert records["sl"] == {
        "path": "sl",
        "kind": "symlink",
        "mode": 0o777,
        "mtime_ns": 0,
        "size": 3,
        "nlink": 1,
        "target": "big",
    }
    assert entry_json(d("x"), 2) == entry_json(d("x"), 2)  # stable, sorted keys
    assert list(json.loads(entry_json(big, 1))) == sorted(json.loads(entry_json(big, 1)))


# -- diff_manifests --------------------------------------------------------------------------
def four_chunk(path: str, changed: dict[int, str] | None = None, size: int = 3 * CS + 5) -> Entry:
    tags = [f"{path}#{i}" for i in range(chunk_count(size, CS))]
    for i, tag in (changed or {}).items():
        tags[i] = tag
    return f(path, size, tag="|".join(tags), chunk_tags=tags)


def test_diff_identical_is_empty() -> None:
    m = man(d("a"), f("a/x"), four_chunk("big"))
    diff = diff_manifests(m, man(*m.entries))
    assert (diff.added, diff.removed, diff.changed, diff.new_blob_bytes) == ([], [], [], 0)
    assert diff.lines() == [
        "0 added (0 bytes), 0 removed (0 bytes), 0 changed (0 bytes differ); "
        "0 bytes of blobs new in the second"
    ]


def test_diff_added_removed_changed() -> None:
    a = man(
        d("d"),
        f("d/gone", 7),
        f("d/same", 4),
        f("mode", 1, mode=0o644),
        f("mt", 1, mtime=1),
        sl("s", "x"),
        four_chunk("big"),
    )
    b = man(
        d("d"),
        f("d/new", 11),
        d("d/newdir"),
        f("d/same", 4),
        f("mode", 1, mode=0o600),
        f("mt", 1, mtime=2),
        sl("s", "yy"),
        four_chunk("big", {1: "middle changed"}),
    )
    diff = diff_manifests(a, b)
    assert [e.path for e in diff.added] == ["d/new", "d/newdir"]
    assert [e.path for e in diff.removed] == ["d/gone"]
    changed = {c.path: c for c in diff.changed}
    assert set(changed) == {"big", "mode", "mt", "s"}
    assert changed["big"].bytes_differ == CS  # only the middle chunk
    assert changed["big"].what == (f"content {3 * CS + 5}->{3 * CS + 5} bytes, {CS} differ",)
    assert changed["mode"].what == ("mode 644->600",)
    assert changed["mode"].bytes_differ == 0
    assert changed["mt"].what == ("mtime",)
    assert changed["s"].what == ("target 'x'->'yy'",)
    assert diff.new_blob_bytes == 11 + CS
    lines = diff.lines()
    assert lines[:-1] == [
        "M big (content 196613->196613 bytes, 65536 differ)",
        "- d/gone (7 bytes)",
        "+ d/new (11 bytes)",
        "+ d/newdir (0 bytes)",
        "M mode (mode 644->600)",
        "M mt (mtime)",
        "M s (target 'x'->'yy')",
    ]
    assert lines[-1] == (
        f"2 added (11 bytes), 1 removed (7 bytes), 4 changed ({CS} bytes differ); "
        f"{11 + CS} bytes of blobs new in the second"
    )


@pytest.mark.parametrize(
    ("old", "new", "differ"),
    [
        # last, short chunk changed: only its 5 bytes
        (four_chunk("big"), four_chunk("big", {3: "tail"}), 5),
        # first and third changed
        (four_chunk("big"), four_chunk("big", {0: "x", 2: "y"}), 2 * CS),
        # grown by a new chunk: the old last chunk is full, so only the new one differs
        (four_chunk("big", size=2 * CS), four_chunk("big", size=2 * CS + 10), 10),
        # grown within the last chunk: that chunk differs
        (four_chunk("big", size=CS + 5), four_chunk("big", {1: "t"}, size=CS + 10), 10),
        # shrunk by a chunk: the cut-off bytes differ
        (four_chunk("big", size=3 * CS), four_chunk("big", size=2 * CS), CS),
        # chunked to small and back: the whole content is counted
        (four_chunk("big", size=2 * CS), f("big", 100), 2 * CS),
        (f("big", 100), four_chunk("big", size=2 * CS), 2 * CS),
        # small files: the larger size
        (f("big", 10), f("big", 30, tag="other"), 30),
    ],
    ids=["tail", "two", "grown-chunk", "grown-tail", "shrunk", "to-small", "to-big", "small"],
)
def test_diff_bytes_differ(old: Entry, new: Entry, differ: int) -> None:
    diff = diff_manifests(man(old), man(new))
    assert [c.path for c in diff.changed] == ["big"]
    assert diff.changed[0].bytes_differ == differ
    assert f"{differ} differ" in diff.changed[0].what[0]


def test_diff_new_blob_bytes_counts_each_new_blob_once() -> None:
    a = man(four_chunk("big"))
    b = man(
        four_chunk("big", {1: "n1"}),
        four_chunk("copy", {1: "n1"}),  # shares the new chunk, adds its own three
        f("dup1", 50, tag="same"),
        f("dup2", 50, tag="same"),
    )
    diff = diff_manifests(a, b)
    assert diff.new_blob_bytes == CS + (CS + CS + 5) + 50


def test_diff_kind_change() -> None:
    diff = diff_manifests(man(f("p", 3)), man(d("p")))
    assert [c.path for c in diff.changed] == ["p"]
    assert diff.changed[0].what[0] == "kind f->d"


def test_diff_counts_hard_linked_content_once() -> None:
    """Like the added/removed totals, changed bytes count a hard-linked file's content once."""
    old, new = f("f", 10, tag="v1"), f("f", 10, tag="v2")
    diff = diff_manifests(man(old, hl("h", old)), man(new, hl("h", new)))
    assert {c.path for c in diff.changed} == {"f", "h"}
    assert diff.lines()[-1].startswith(
        "0 added (0 bytes), 0 removed (0 bytes), 2 changed (10 bytes differ)"
    )


def test_diff_totals_skip_hard_links_when_added() -> None:
    base = f("f", 10)
    diff = diff_manifests(man(d("x")), man(d("x"), base, hl("h", base)))
    assert diff.lines()[-1].startswith("2 added (10 bytes)")
    assert diff.new_blob_bytes == 10
