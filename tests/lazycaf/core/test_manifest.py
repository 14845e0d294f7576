"""Tests for lazycaf.core.manifest: the data model, validation and the canonical v1 encoding.

Bad manifests are built two ways: through ``Manifest(...)`` (the constructor validates), and
as raw bytes from ``pack`` below, an independent writer of the documented layout, so decoding
can be fed things the encoder would never produce.
"""

from __future__ import annotations

import random
import stat
import struct
from typing import NamedTuple

import pytest

from lazycaf.core.chunking import chunk_count
from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError, ManifestError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest, check_path

CS = 64 << 10  # the smallest valid chunk size keeps chunk lists short


# -- builders --------------------------------------------------------------------------------
def D(tag: str) -> Digest:
    return Digest.of(tag.encode())


EMPTY = Digest.of(b"")  # the one digest a file of size 0 can have


def d(path: str, mode: int = 0o755, mtime: int = 1_000) -> Entry:
    return Entry(path, DIR, mode, mtime, 0)


def f(
    path: str, size: int = 3, *, tag: str | None = None, mode: int = 0o644, mtime: int = 2_000
) -> Entry:
    tag = tag or path
    chunks = tuple(D(f"{tag}#{i}") for i in range(chunk_count(size, CS)))
    return Entry(path, FILE, mode, mtime, size, D(tag) if size else EMPTY, chunks)


def sl(path: str, target: str, mtime: int = 3_000) -> Entry:
    return Entry(path, SYMLINK, 0o777, mtime, len(target.encode()), target=target)


def hl(path: str, of: Entry) -> Entry:
    return of._replace(path=path, kind=HARDLINK, target=of.path)


def man(*entries: Entry, **kw: int) -> Manifest:
    kw.setdefault("chunk_size", CS)
    return Manifest(entries, **kw)


class Row(NamedTuple):
    """One entry as it sits in the columns (no canonical zeroing applied)."""

    path: str
    kind: str
    mode: int
    mtime: int
    size: int
    target: str | None = None
    digest: bytes | None = None
    chunks: tuple[bytes, ...] = ()


def row(e: Entry) -> Row:
    linkish = e.kind in (SYMLINK, HARDLINK)
    return Row(
        e.path,
        e.kind,
        0 if linkish else e.mode,
        0 if e.kind == HARDLINK else e.mtime_ns,
        e.size if e.kind in (FILE, SYMLINK) else 0,
        e.target if linkish else None,
        e.digest.raw if e.kind == FILE and e.digest else None,
        tuple(c.raw for c in e.chunks) if e.kind == FILE else (),
    )


def pack(
    rows: list[Row],
    *,
    magic: bytes = b"LZCAFMAN",
    version: int = 1,
    flags: int = 0,
    chunk_size: int = CS,
    root_mode: int = 0o755,
    root_mtime_ns: int = 0,
    n: int | None = None,
) -> bytes:
    """Write the documented v1 layout from rows, whatever they hold."""
    count = len(rows) if n is None else n
    cols = [
        "".join(r.kind for r in rows).encode(),
        struct.pack(f"<{len(rows)}H", *(r.mode for r in rows)),
        struct.pack(f"<{len(rows)}q", *(r.mtime for r in rows)),
        struct.pack(f"<{len(rows)}Q", *(r.size for r in rows)),
        "\0".join(r.path for r in rows).encode(),
        "\0".join(r.target or "" for r in rows if r.kind in (SYMLINK, HARDLINK)).encode(),
        b"".join(r.digest for r in rows if r.digest is not None),
        b"".join(c for r in rows for c in r.chunks),
    ]
    header = struct.pack(
        "<8sHHIIqI", magic, version, flags, chunk_size, root_mode, root_mtime_ns, count
    )
    return header + b"".join(struct.pack("<Q", len(c)) + c for c in cols)


def pack_entries(*entries: Entry, **kw: int) -> bytes:
    return pack([row(e) for e in entries], **kw)  # type: ignore[arg-type]


def sample() -> Manifest:
    """Every kind: dirs, small/empty/exact/chunked files, symlinks, hard links, non-ASCII."""
    big = f("bin/python", 2 * CS + 5, mode=0o755)
    lib = f("lib/libz.so", 1000, mode=0o755)
    return man(
        d("bin"),
        big,
        sl("bin/python3", "python"),
        d("lib"),
        lib,
        hl("lib/libz.so.1", lib),
        d("lib/données"),
        f("lib/données/日本語.txt", 12),
        f("lib/empty", 0, mtime=-5),
        f("lib/exact", CS),
        f("lib/over", CS + 1),
        hl("lib/py-hard", big),
        d("share", mode=0o700),
        sl("share/abs", "/usr/share/zoneinfo"),
        root_mode=0o750,
        root_mtime_ns=1_700_000_000_123_456_789,
    )


def same(a: Manifest, b: Manifest) -> bool:
    return (a.entries, a.chunk_size, a.root_mode, a.root_mtime_ns) == (
        b.entries,
        b.chunk_size,
        b.root_mode,
        b.root_mtime_ns,
    )


def must_fail_naming(data: bytes, name: str, match: str = "") -> ManifestError:
    with pytest.raises(ManifestError) as info:
        Manifest.decode(data)
    assert f"entry {name!r}" in str(info.value), str(info.value)
    assert match in str(info.value)
    return info.value


# -- the layout ------------------------------------------------------------------------------
def test_encoding_follows_the_documented_layout() -> None:
    m = sample()
    assert m.encode() == pack_entries(
        *m.entries, chunk_size=CS, root_mode=0o750, root_mtime_ns=m.root_mtime_ns
    )
    assert m.encode().startswith(b"LZCAFMAN\x01\x00\x00\x00")


def test_round_trip_every_kind() -> None:
    m = sample()
    back = Manifest.decode(m.encode())
    assert same(back, m)
    assert back.encode() == m.encode()
    assert back.digest == m.digest
    kinds = {e.kind for e in back}
    assert kinds == {DIR, FILE, SYMLINK, HARDLINK}
    assert back.get("bin/python") is not None
    assert len(back.by_path["bin/python"].chunks) == 3
    assert back.by_path["lib/exact"].chunks == ()
    assert len(back.by_path["lib/over"].chunks) == 2
    assert back.by_path["lib/empty"].mtime_ns == -5


def test_hard_links_decode_with_their_files_attributes() -> None:
    back = Manifest.decode(sample().encode())
    h = back.by_path["lib/py-hard"]
    target = back.by_path["bin/python"]
    assert h.kind == HARDLINK
    assert h.target == "bin/python"
    assert (h.mode, h.mtime_ns, h.size, h.digest, h.chunks) == (
        target.mode,
        target.mtime_ns,
        target.size,
        target.digest,
        target.chunks,
    )


def test_round_trip_extreme_values() -> None:
    big_cs = 64 << 20
    size = 2**40 + 1  # 1 TiB + 1: 16385 chunks of 64 MiB
    chunks = tuple(D(f"c{i}") for i in range(chunk_count(size, big_cs)))
    m = Manifest(
        [
            d("d", mode=0o7777, mtime=-(2**63)),
            Entry("d/f", FILE, 0, 2**63 - 1, size, D("f"), chunks),
            sl("d/l", "x" * 5000),
        ],
        chunk_size=big_cs,
        root_mode=0o7777,
        root_mtime_ns=-(2**63),
    )
    back = Manifest.decode(m.encode())
    assert same(back, m)
    assert len(back.by_path["d/f"].chunks) == 16385


@pytest.mark.parametrize("chunk_size", [64 << 10, 1 << 20, 64 << 20])
def test_round_trip_keeps_chunk_size(chunk_size: int) -> None:
    size = chunk_size * 2 + 1
    e = Entry("f", FILE, 0o644, 0, size, D("f"), tuple(D(f"c{i}") for i in range(3)))
    m = Manifest([e], chunk_size=chunk_size)
    back = Manifest.decode(m.encode())
    assert back.chunk_size == chunk_size
    assert same(back, m)


def test_non_ascii_paths_round_trip_in_code_point_order() -> None:
    names = ["z", "é", "e\u0301", "日本語", "\uffff", "😀", "a b", "tab\tname", "back\\slash"]
    m = man(*(f(n, 4) for n in names), sl("lien→", "😀"))
    back = Manifest.decode(m.encode())
    assert same(back, m)
    paths = [e.path for e in back]
    assert paths == sorted(paths)
    # UTF-8 byte order agrees with code point order.
    assert [p.encode() for p in paths] == sorted(p.encode() for p in paths)
    assert back.by_path["lien→"].size == len("😀".encode())


def test_empty_manifest_round_trips() -> None:
    """An empty tree packs to a manifest without entries; it must construct and decode."""
    m = Manifest([], chunk_size=CS)
    assert len(m) == 0
    back = Manifest.decode(m.encode())
    assert len(back) == 0
    assert back.blobs() == {}


# -- canonical bytes -------------------------------------------------------------------------
def test_same_entries_in_any_order_give_identical_bytes() -> None:
    base = sample()
    rng = random.Random(1234)
    for _ in range(20):
        shuffled = list(base.entries)
        rng.shuffle(shuffled)
        m = Manifest(
            shuffled,
            chunk_size=CS,
            root_mode=base.root_mode,
            root_mtime_ns=base.root_mtime_ns,
        )
        assert m.encode() == base.encode()
        assert m.digest == base.digest


def test_digest_is_blake3_of_the_bytes_and_changes_with_any_attribute() -> None:
    m = sample()
    assert m.digest == Digest.of(m.encode())
    base = m.entries
    variants = [
        Manifest(base, chunk_size=CS, root_mode=0o755, root_mtime_ns=m.root_mtime_ns),
        Manifest(base, chunk_size=CS, root_mode=0o750, root_mtime_ns=0),
        man(
            *[e._replace(mtime_ns=e.mtime_ns + 1) if e.path == "lib" else e for e in base],
            root_mode=0o750,
            root_mtime_ns=m.root_mtime_ns,
        ),
        man(
            *[e._replace(mode=0o555) if e.path == "lib" else e for e in base],
            root_mode=0o750,
            root_mtime_ns=m.root_mtime_ns,
        ),
    ]
    digests = {v.digest for v in variants} | {m.digest}
    assert len(digests) == len(variants) + 1
    small = [d("a"), f("a/x", 10)]
    assert Manifest(small, chunk_size=CS).digest != Manifest(small, chunk_size=2 * CS).digest


def canonical_or_rejected(data: bytes) -> None:
    try:
        m = Manifest.decode(data)
    except ManifestError:
        return
    assert m.encode() == data, "decode accepted bytes that do not re-encode to themselves"


@pytest.mark.parametrize(
    "tweak",
    ["symlink-mode", "dir-size", "hardlink-mode", "hardlink-mtime", "hardlink-size"],
)
def test_decode_accepts_only_canonical_bytes(tweak: str) -> None:
    """One tree, one digest: fields the format pins to 0 must be 0, or decoding fails."""
    lib = f("lib", 10)
    rows = [row(lib), row(hl("link", lib)), row(d("sub")), row(sl("sym", "lib"))]
    assert Manifest.decode(pack(rows)).encode() == pack(rows)
    if tweak == "symlink-mode":
        rows[3] = rows[3]._replace(mode=0o644)
    elif tweak == "dir-size":
        rows[2] = rows[2]._replace(size=4096)
    elif tweak == "hardlink-mode":
        rows[1] = rows[1]._replace(mode=0o644)
    elif tweak == "hardlink-mtime":
        rows[1] = rows[1]._replace(mtime=2_000)
    else:
        rows[1] = rows[1]._replace(size=10)
    canonical_or_rejected(pack(rows))


# -- decode validation: every error names the bad entry ---------------------------------------
BAD_PATHS = [
    ("..", []),
    ("a/..", ["a"]),
    ("a/../b", ["a"]),
    (".", []),
    ("a/.", ["a"]),
    ("a/./b", ["a"]),
    ("/a", []),
    ("a/", []),
    ("a//b", ["a"]),
    ("", []),
]


@pytest.mark.parametrize(("bad", "dirs"), BAD_PATHS, ids=[repr(b) for b, _ in BAD_PATHS])
def test_decode_rejects_bad_paths_naming_them(bad: str, dirs: list[str]) -> None:
    rows = [row(d(p)) for p in dirs] + [row(f(bad or "x"))._replace(path=bad)]
    rows.sort(key=lambda r: r.path)
    must_fail_naming(pack(rows), bad)


@pytest.mark.parametrize(("bad", "dirs"), BAD_PATHS, ids=[repr(b) for b, _ in BAD_PATHS])
def test_constructor_rejects_bad_paths_naming_them(bad: str, dirs: list[str]) -> None:
    with pytest.raises(ManifestError, match=f"entry {bad!r}"):
        man(*(d(p) for p in dirs), f(bad or "x")._replace(path=bad))


def test_check_path() -> None:
    assert check_path("a/b/c.txt") is None
    assert check_path("...") is None
    assert check_path(".hidden/..x") is None
    for bad in ["", "/a", "a/", "a//b", "a\0b", ".", "..", "a/./b", "x/.."]:
        assert check_path(bad) is not None, bad


def test_names_and_paths_may_be_as_long_as_linux_allows() -> None:
    name = "n" * 255
    deep = [name[:250] + f"{i:05d}" for i in range(15)]  # 15 x 255 bytes and 14 '/'
    dirs = ["/".join(deep[: i + 1]) for i in range(len(deep))]
    last = dirs[-1] + "/" + "é" * 127 + "x"  # a name of 255 bytes: the path has 4,095
    assert len(last.encode()) == 4095
    m = man(*(d(p) for p in dirs), f(last), f(name))
    assert same(Manifest.decode(m.encode()), m)
    assert check_path(last) is None


LONG_NAMES = [
    ("n" * 256, "name of 256 bytes"),
    ("é" * 128, "name of 256 bytes"),  # 128 characters, but 256 bytes
    ("a/" + "x" * 300, "name of 300 bytes"),
]


@pytest.mark.parametrize(("bad", "match"), LONG_NAMES, ids=["ascii", "utf8", "nested"])
def test_names_over_255_bytes_are_rejected_naming_the_entry(bad: str, match: str) -> None:
    dirs = ["a"] if "/" in bad else []
    rows = [row(d(p)) for p in dirs] + [row(f(bad))]
    must_fail_naming(pack(rows), bad, match)
    with pytest.raises(ManifestError, match=f"entry {bad!r}: {match}"):
        man(*(d(p) for p in dirs), f(bad))  # the encoder's side refuses it too
    assert check_path(bad) == f"{match} (at most 255)"


def test_paths_over_4095_bytes_are_rejected_naming_the_entry() -> None:
    parts = [f"{i:03d}" + "d" * 197 for i in range(21)]  # 21 x 201 = 4,221 bytes
    paths = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    rows = [row(d(p)) for p in paths]
    with pytest.raises(ManifestError) as info:
        Manifest.decode(pack(rows))
    msg = str(info.value)
    assert "path of 4220 bytes (at most 4095)" in msg
    assert paths[-1][:100] in msg and paths[-1][-100:] in msg  # named, shortened to a line
    assert len(msg) < 600 and "\n" not in msg
    with pytest.raises(ManifestError, match="path of 4220 bytes"):
        man(*(d(p) for p in paths))
    assert check_path(paths[-1]) == "path of 4220 bytes (at most 4095)"
    assert check_path(paths[-2]) is None


def test_decode_rejects_bytes_in_columns_no_entry_owns() -> None:
    """Found by tests/faults/test_fuzz_manifest.py: without a link the targets column was not
    read, and without entries the paths column, so bytes there decoded to the same tree
    under another digest."""
    for rows, column in (([row(f("a"))], 5), ([], 4)):
        data = pack(rows)
        cols, pos = [], 32  # after the header: (offset of each length field, length)
        for _ in range(8):
            (length,) = struct.unpack_from("<Q", data, pos)
            cols.append((pos, length))
            pos += 8 + length
        at, length = cols[column]
        assert length == 0
        bad = data[:at] + struct.pack("<Q", 1) + b"x" + data[at + 8 :]
        with pytest.raises(ManifestError, match="bytes that no entry owns"):
            Manifest.decode(bad)


def test_decode_rejects_duplicates() -> None:
    must_fail_naming(pack([row(d("a")), row(d("a"))]), "a", "duplicate")


def test_decode_rejects_out_of_order() -> None:
    must_fail_naming(pack([row(d("b")), row(d("a"))]), "a", "out of order")
    must_fail_naming(pack([row(d("a")), row(f("a/z")), row(f("a/b"))]), "a/b")


def test_decode_rejects_missing_parent() -> None:
    must_fail_naming(pack([row(f("a/b"))]), "a/b", "parent")
    must_fail_naming(pack([row(d("a")), row(f("a/b/c"))]), "a/b/c", "parent")


@pytest.mark.parametrize("parent", [f("a"), sl("a", "elsewhere")], ids=["file", "symlink"])
def test_decode_rejects_parent_that_is_not_a_directory(parent: Entry) -> None:
    must_fail_naming(pack([row(parent), row(f("a/b"))]), "a/b", "parent")


def test_decode_rejects_parent_that_is_a_hard_link() -> None:
    a = f("a")
    must_fail_naming(pack([row(a), row(hl("b", a)), row(f("b/c"))]), "b/c", "parent")


@pytest.mark.parametrize("mode", [0o10000, 0xFFFF])
def test_decode_rejects_mode_over_7777_naming_the_entry(mode: int) -> None:
    rows = [row(d("x")), row(d("x/a")), row(f("x/y"))._replace(mode=mode), row(f("x/z"))]
    must_fail_naming(pack(rows), "x/y")


def test_decode_rejects_root_mode_over_7777() -> None:
    with pytest.raises(ManifestError, match="root"):
        Manifest.decode(pack([row(d("a"))], root_mode=0o10000))


def test_decode_rejects_unknown_kind() -> None:
    must_fail_naming(pack([row(d("a"))._replace(kind="x")]), "a", "kind")


def test_decode_rejects_non_ascii_kind() -> None:
    data = pack([row(d("a"))]).replace(
        b"\x01\x00\x00\x00\x00\x00\x00\x00d", b"\x01" + b"\0" * 7 + b"\xff"
    )
    assert data != pack([row(d("a"))])
    with pytest.raises(ManifestError):
        Manifest.decode(data)


@pytest.mark.parametrize(
    "target_row",
    [
        None,  # missing
        row(d("dir")),
        row(sl("sym", "file")),
    ],
    ids=["missing", "directory", "symlink"],
)
def test_decode_rejects_hard_link_to_a_non_file(target_row: Row | None) -> None:
    rows = [row(f("file"))]
    if target_row is not None:
        rows.append(target_row)
    name = target_row.path if target_row else "nope"
    rows.append(Row("zlink", HARDLINK, 0, 0, 0, target=name))
    rows.sort(key=lambda r: r.path)
    must_fail_naming(pack(rows), "zlink", "hard link")


def test_decode_rejects_hard_link_to_a_hard_link() -> None:
    a = f("a")
    rows = [row(a), row(hl("b", a)), Row("c", HARDLINK, 0, 0, 0, target="b")]
    must_fail_naming(pack(rows), "c", "hard link")


def test_decode_rejects_hard_link_to_a_later_file() -> None:
    """A hard link names the first path of its inode group: an earlier file entry."""
    rows = [Row("a", HARDLINK, 0, 0, 0, target="b"), row(f("b"))]
    with pytest.raises(ManifestError, match="'a'"):
        Manifest.decode(pack(rows))


def test_decode_rejects_chunk_list_shorter_than_size_needs() -> None:
    big = f("big", 3 * CS)
    r = row(big)._replace(chunks=row(big).chunks[:2])
    must_fail_naming(pack([r]), "big", "chunk")


def test_decode_rejects_chunk_list_longer_than_size_needs() -> None:
    big = f("big", 3 * CS)
    r = row(big)._replace(size=2 * CS)  # needs 2 chunks, carries 3
    must_fail_naming(pack([r]), "big", "chunk")


def test_decode_rejects_chunks_on_a_small_file() -> None:
    r = row(f("small", 10))._replace(chunks=(D("x").raw,))
    with pytest.raises(ManifestError, match="chunk"):
        Manifest.decode(pack([r]))


def test_decode_rejects_an_empty_file_whose_digest_is_not_the_empty_blobs() -> None:
    """A file of size 0 would mount as an empty file whatever its digest promises."""
    good = [d("x"), f("x/a", 0), f("x/b", 5), f("x/z", 0)]
    bad = f("x/m", 0)._replace(digest=D("x/m"))
    rows = sorted(map(row, [*good, bad, hl("x/n", bad)]), key=lambda r: r.path)
    err = must_fail_naming(pack(rows), "x/m")
    assert f"size 0, but {D('x/m')} is not the empty blob" in str(err)
    Manifest.decode(pack_entries(*good))  # the same files with the empty blob's digest pass


def test_constructor_rejects_an_empty_file_whose_digest_is_not_the_empty_blobs() -> None:
    bad = f("b", 0)._replace(digest=D("b"))
    with pytest.raises(ManifestError, match=f"entry 'b': size 0, but {D('b')} is not the empty"):
        man(f("a", 0), bad, hl("c", bad))
    assert man(f("a", 0), f("b", 0), hl("c", f("b", 0))).by_path["b"].digest == EMPTY


def test_decode_rejects_bad_symlink_targets() -> None:
    must_fail_naming(pack([row(sl("l", "x"))._replace(target="")]), "l", "symlink")
    must_fail_naming(pack([row(sl("l", "abc"))._replace(size=2)]), "l", "symlink")
    must_fail_naming(pack([row(sl("l", "é"))._replace(size=1)]), "l", "symlink")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"magic": b"LZCAFMAM"}, "magic"),
        ({"magic": b"\0" * 8}, "magic"),
        ({"version": 2}, "version"),
        ({"version": 0}, "version"),
        ({"flags": 1}, "version"),
        ({"chunk_size": 1000}, "chunk size"),
        ({"chunk_size": 0}, "chunk size"),
        ({"n": 5}, "count"),
        ({"n": 3}, "count"),
        ({"n": 0xFFFFFFFF}, "count"),
    ],
)
def test_decode_rejects_bad_headers(kw: dict[str, object], match: str) -> None:
    rows = [row(d("a")), row(f("a/b")), row(sl("a/c", "b")), row(f("x"))]
    assert len(Manifest.decode(pack(rows))) == 4  # the same rows, unharmed, are fine
    with pytest.raises(ManifestError, match=match):
        Manifest.decode(pack(rows, **kw))  # type: ignore[arg-type]


def test_decode_rejects_trailing_bytes() -> None:
    data = sample().encode()
    for extra in (b"\0", b"x" * 100):
        with pytest.raises(ManifestError, match="trailing"):
            Manifest.decode(data + extra)


def test_decode_rejects_huge_column_lengths() -> None:
    data = bytearray(sample().encode())
    header = struct.calcsize("<8sHHIIqI")
    for length in (2**64 - 1, 2**63, len(data)):
        mutated = bytearray(data)
        mutated[header : header + 8] = struct.pack("<Q", length)
        with pytest.raises(ManifestError):
            Manifest.decode(bytes(mutated))


def test_decode_rejects_invalid_utf8_paths_and_targets() -> None:
    data = pack([row(f("aé")), row(sl("l", "é"))])
    for good, bad in ((b"a\xc3\xa9", b"a\xc3\x28"), (b"\x00\xc3\xa9", b"\x00\xff\xfe")):
        assert good in data
        with pytest.raises(ManifestError):
            Manifest.decode(data.replace(good, bad, 1))


def test_decode_error_names_the_manifest() -> None:
    with pytest.raises(ManifestError, match=r"^trainer:latest: "):
        Manifest.decode(b"garbage", name="trainer:latest")


def test_manifest_error_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError):
        Manifest.decode(b"")


def test_every_truncation_raises_manifest_error() -> None:
    data = sample().encode()
    for cut in range(len(data)):
        with pytest.raises(ManifestError):
            Manifest.decode(data[:cut])


def test_random_byte_flips_never_crash() -> None:
    """Corruption either raises ManifestError or yields a manifest that is valid."""
    data = sample().encode()
    rng = random.Random(20240607)
    accepted = 0
    for trial in range(3000):
        mutated = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3))):
            mutated[rng.randrange(len(mutated))] ^= rng.randrange(1, 256)
        try:
            m = Manifest.decode(bytes(mutated))
        except ManifestError:
            continue
        except Exception as exc:  # pragma: no cover - the failure being tested for
            raise AssertionError(f"trial {trial}: {type(exc).__name__}: {exc}") from exc
        accepted += 1
        # valid: the constructor accepts it, and its own encoding decodes again
        again = Manifest(
            m.entries,
            chunk_size=m.chunk_size,
            root_mode=m.root_mode,
            root_mtime_ns=m.root_mtime_ns,
        )
        Manifest.decode(again.encode())
    # Flips in the digest columns decode fine: the fuzz reached the accept path too.
    assert accepted > 0


def test_random_garbage_never_crashes() -> None:
    rng = random.Random(7)
    header = pack([])[:36]
    for _ in range(500):
        tail = rng.randbytes(rng.randrange(0, 200))
        for data in (tail, header + tail):
            with pytest.raises(ManifestError):
                Manifest.decode(data)


# -- constructor validation ------------------------------------------------------------------
def test_constructor_sorts_entries() -> None:
    m = man(f("b/x"), d("b"), d("a"), f("a/y"), f("a-z"))
    assert [e.path for e in m] == ["a", "a-z", "a/y", "b", "b/x"]


def test_constructor_rejects_duplicates() -> None:
    with pytest.raises(ManifestError, match="entry 'a': duplicate"):
        man(d("a"), d("a"))
    with pytest.raises(ManifestError, match="entry 'a'"):
        man(d("a"), f("a"))


def test_constructor_rejects_missing_or_non_directory_parents() -> None:
    with pytest.raises(ManifestError, match="entry 'a/b': parent"):
        man(f("a/b"))
    with pytest.raises(ManifestError, match="entry 'a/b': parent"):
        man(f("a"), f("a/b"))
    with pytest.raises(ManifestError, match="entry 'a/b': parent"):
        man(sl("a", "x"), f("a/b"))


@pytest.mark.parametrize("mode", [0o10000, 0o40755, -1])
def test_constructor_rejects_bad_modes(mode: int) -> None:
    with pytest.raises(ManifestError, match="entry 'x'"):
        man(d("a"), f("x", mode=mode))


@pytest.mark.parametrize("root_mode", [0o10000, -1])
def test_constructor_rejects_bad_root_modes(root_mode: int) -> None:
    with pytest.raises(ManifestError, match="root"):
        man(d("a"), root_mode=root_mode)


@pytest.mark.parametrize("chunk_size", [1000, (64 << 10) + 1, 128 << 20])
def test_constructor_rejects_chunk_sizes_decode_would_reject(chunk_size: int) -> None:
    with pytest.raises(ManifestError):
        Manifest([d("a")], chunk_size=chunk_size)


@pytest.mark.parametrize("kind", ["x", "D", "", "ff"])
def test_constructor_rejects_unknown_kinds(kind: str) -> None:
    with pytest.raises(ManifestError, match="entry 'a'"):
        man(Entry("a", kind, 0o644, 0, 0))


def test_constructor_rejects_file_without_digest() -> None:
    with pytest.raises(ManifestError, match="entry 'a': file without a digest"):
        man(Entry("a", FILE, 0o644, 0, 3))


@pytest.mark.parametrize(
    ("size", "nchunks"), [(CS + 1, 1), (CS + 1, 3), (3 * CS, 2), (10, 1), (CS, 1), (0, 1)]
)
def test_constructor_rejects_chunk_lists_that_disagree_with_size(size: int, nchunks: int) -> None:
    e = Entry("a", FILE, 0o644, 0, size, D("a"), tuple(D(str(i)) for i in range(nchunks)))
    with pytest.raises(ManifestError, match=f"entry 'a': size {size} needs"):
        man(e)


def test_constructor_rejects_bad_hard_links() -> None:
    a = f("a")
    with pytest.raises(ManifestError, match="entry 'h'"):
        man(a, Entry("h", HARDLINK, 0o644, 0, 3, D("a"), target="nope"))
    with pytest.raises(ManifestError, match="entry 'h'"):
        man(d("a"), Entry("h", HARDLINK, 0o755, 1_000, 0, target="a"))
    with pytest.raises(ManifestError, match="entry 'h'"):
        man(a, hl("h", a)._replace(mode=0o600))
    with pytest.raises(ManifestError, match="entry 'h'"):
        man(a, hl("h", a)._replace(digest=D("other")))
    with pytest.raises(ManifestError, match="entry 'a'"):  # names a later file
        man(hl("a", f("b")), f("b"))
    with pytest.raises(ManifestError, match="entry 'c'"):  # names another hard link
        man(a, hl("b", a), hl("c", a)._replace(target="b"))


@pytest.mark.parametrize(
    "entry",
    [
        Entry("l", SYMLINK, 0o777, 0, 0, target=""),
        Entry("l", SYMLINK, 0o777, 0, 0, target=None),
        Entry("l", SYMLINK, 0o777, 0, 2, target="abc"),
        Entry("l", SYMLINK, 0o777, 0, 3, target="a\0b"),
        Entry("l", SYMLINK, 0o777, 0, 1, target="é"),
    ],
    ids=["empty", "none", "size", "nul", "utf8-size"],
)
def test_constructor_rejects_bad_symlinks(entry: Entry) -> None:
    with pytest.raises(ManifestError, match="entry 'l': bad symlink target"):
        man(entry)


def test_constructed_manifests_round_trip() -> None:
    """Anything the constructor accepts must decode back to the same manifest."""
    cases = [
        sample(),
        man(d("a")),
        man(f("only", 0)),
        man(sl("dangling", "../../nowhere")),
        Manifest([f("x", 5)], chunk_size=64 << 20),
    ]
    for m in cases:
        assert same(Manifest.decode(m.encode()), m)


# -- queries ---------------------------------------------------------------------------------
def test_get_len_iter_and_total_bytes() -> None:
    m = sample()
    assert m.get("/bin/python/") is m.by_path["bin/python"]
    assert m.get("bin") is not None
    assert m.get("nope") is None
    assert len(m) == len(m.entries) == len(list(m))
    # hard links and symlinks add nothing: each file's bytes count once
    files = [e for e in m if e.kind == FILE]
    assert m.total_bytes() == sum(e.size for e in files)
    assert m.total_bytes() == (2 * CS + 5) + 1000 + 12 + 0 + CS + (CS + 1)


def test_entry_st_mode_and_blob_digests() -> None:
    m = sample()
    assert m.by_path["bin"].st_mode == stat.S_IFDIR | 0o755
    assert m.by_path["bin/python3"].st_mode == stat.S_IFLNK | 0o777
    assert m.by_path["lib/libz.so"].st_mode == stat.S_IFREG | 0o755
    assert m.by_path["lib/libz.so.1"].st_mode == stat.S_IFREG | 0o755
    big = m.by_path["bin/python"]
    assert big.blob_digests() == big.chunks
    assert len(big.blob_digests()) == 3
    small = m.by_path["lib/exact"]
    assert small.blob_digests() == (small.digest,)
    assert m.by_path["bin"].blob_digests() == ()
    assert m.by_path["bin/python3"].blob_digests() == ()


def tree() -> Manifest:
    bf = f("a/b/f", 7)
    return man(
        d("a"),
        sl("a/abs", "/etc/passwd"),
        d("a/b"),
        f("a/b/f", 7),
        sl("a/chain", "lb/./f"),
        sl("a/dangling", "nope"),
        sl("a/escape", "../../x"),
        sl("a/lb", "b"),
        sl("a/lf", "b/f"),
        sl("a/loop1", "loop2"),
        sl("a/loop2", "loop1"),
        sl("a/self", "self"),
        sl("a/up", ".."),
        d("a-b"),
        f("a-b/g"),
        d("ab"),
        f("ab/y"),
        hl("h", bf),
        sl("top", "a/b/f"),
        sl("x", "a/b"),
    )


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("a/b/f", "a/b/f"),
        ("a/b", "a/b"),
        ("./a//b/./f", "a/b/f"),
        ("/a/b/f", "a/b/f"),
        ("a/lf", "a/b/f"),
        ("a/lb", "a/b"),
        ("a/lb/f", "a/b/f"),
        ("a/chain", "a/b/f"),
        ("top", "a/b/f"),
        ("a/up/a/b/f", "a/b/f"),
        ("a/up/top", "a/b/f"),
        ("a/b/../b/f", "a/b/f"),
        ("a/b/../lf", "a/b/f"),
        # '..' after a symlink applies to where the link led, as open() does
        ("x/../lf", "a/b/f"),
        ("h", "h"),
        ("a/abs", None),
        ("a/loop1", None),
        ("a/self", None),
        ("a/dangling", None),
        ("a/escape", None),
        ("..", None),
        ("a/../..", None),
        ("a/b/f/x", None),
        ("nope", None),
        ("", None),
    ],
)
def test_follow(path: str, want: str | None) -> None:
    got = tree().follow(path)
    assert (got.path if got else None) == want


def test_follow_hop_limit() -> None:
    links = [sl(f"l{i:02d}", f"l{i + 1:02d}") for i in range(45)]
    m = man(*links, f("l45"))
    assert m.follow("l05") is not None  # 40 hops
    assert m.follow("l05").path == "l45"  # type: ignore[union-attr]
    assert m.follow("l04") is None  # 41 hops
    assert m.follow("l40", max_hops=5) is not None
    assert m.follow("l39", max_hops=5) is None


def test_children() -> None:
    m = tree()
    top = [e.path for e in m.children("")]
    assert top == ["a", "a-b", "ab", "h", "top", "x"]
    assert [e.path for e in m.children("/")] == top
    a = [e.path.rpartition("/")[2] for e in m.children("a")]
    assert a == sorted(a)
    assert "b" in a and "lb" in a and "f" not in a
    assert len(a) == 11
    assert [e.path for e in m.children("/a/")] == [e.path for e in m.children("a")]
    assert [e.path for e in m.children("a/b")] == ["a/b/f"]
    assert [e.path for e in m.children("ab")] == ["ab/y"]
    assert m.children("a/b/f") == []
    assert m.children("nope") == []


def test_blobs_dedupes_content_and_sizes_chunks() -> None:
    big = f("big", 2 * CS + 7, tag="big")
    twin = f("twin", 2 * CS + 7, tag="big")  # identical content
    other = Entry("other", FILE, 0o644, 0, CS + 1, D("o"), (big.chunks[0], D("tail")))
    m = man(
        big,
        twin,
        other,
        hl("link", big),
        f("s1", 10, tag="same"),
        f("s2", 10, tag="same"),
        f("empty", 0),
        f("exact", CS),
        d("dir"),
        sl("sym", "big"),
    )
    blobs = m.blobs()
    assert blobs == {
        big.chunks[0]: CS,
        big.chunks[1]: CS,
        big.chunks[2]: 7,
        D("tail"): 1,
        D("same"): 10,
        EMPTY: 0,
        D("exact"): CS,
    }
    # whole-file digests of chunked files are not blobs
    assert D("big") not in blobs
    assert D("o") not in blobs


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (Entry("z", SYMLINK, 0o755, 0, 1, target="a"), "a symlink has mode 777"),
        (Entry("z", DIR, 0o755, 0, 5), "a directory has size 0"),
        (Entry("z", DIR, 0o755, 0, 0, D("z")), "only files have digests"),
        (Entry("z", SYMLINK, 0o777, 0, 1, (), (D("z"),), target="a"), "only files have digests"),
        (f("z")._replace(mtime_ns=1 << 63), "mtime or size does not fit 64 bits"),
        (f("z")._replace(mtime_ns=-(1 << 63) - 1), "mtime or size does not fit 64 bits"),
        (f("z")._replace(size=-1), "mtime or size does not fit 64 bits"),
        (d("z", mtime=1 << 63), "mtime or size does not fit 64 bits"),
        (Entry("z", FILE, 0o644, 0, 0, D("z")), "size 0, but .* is not the empty blob"),
        (Entry("z", FILE, 0o644, 0, CS + 1, D("z")), f"size {CS + 1} needs 2 chunks"),
        (Entry("z", FILE, 0o644, 0, 7), "file without a digest"),
    ],
)
def test_constructor_names_a_bad_entry_among_many_good_ones(bad: Entry, match: str) -> None:
    """The checks run a column at a time when every entry is good: one bad entry in a
    big tree (no hard links) is still found and named."""
    good = [d("a")] + [f(f"a/m{i:04d}", i % 7 + (CS if i % 100 == 0 else 0)) for i in range(500)]
    good += [sl(f"a/l{i}", "m0001") for i in range(20)] + [f("e", 0)]
    man(*good)
    with pytest.raises(ManifestError, match=f"entry 'z': {match}"):
        man(*good, bad)
