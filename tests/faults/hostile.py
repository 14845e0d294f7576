"""A generator of hostile manifests: raw manifest bytes, stored in a CAS directory under refs.

A manifest comes from a CAS, so it is untrusted input. ``cases(outside)`` builds one
``Hostile`` per attack (issue 13's list and the ones the decoder already refused); each is
written here with ``encode_rows``, an independent writer of the documented v1 layout that
validates nothing, so it can say what the project's encoder never would. ``outside`` is a
directory the attacks aim at (absolute paths, links and traversals point into it): a test
asserts that nothing appears there.

Two families:
- ``rejected``: the decoder must refuse the bytes (a ``ManifestError``, exit 4) and name
  the bad entry; every door (ls, cat, mount, materialize) fails with that one line.
- accepted: the bytes decode (they are a valid manifest) but lie about something only the
  blobs or the filesystem reveal (a declared size that is not the blob's length, links that
  leave the tree, a 5,000-byte symlink target, chunks that are nowhere); ``expect`` says
  what each door must answer.

``store(cas_dir, case)`` writes the case's manifest and blobs into a CAS directory and points
the ref ``hostile/<name>`` at it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from lazycaf.cas.casdir import CasDir
from lazycaf.core.digest import Digest

__all__ = [
    "CHUNK",
    "Hostile",
    "Row",
    "accepted_cases",
    "cases",
    "combined",
    "encode_rows",
    "rejected_cases",
    "store",
]

CHUNK = 64 << 10  # the smallest chunk size: chunked files stay small
_HEADER = struct.Struct("<8sHHIIqI")
MiB = 1 << 20


class Row(NamedTuple):
    """One entry as the columns hold it (nothing zeroed or checked)."""

    path: str
    kind: str
    mode: int = 0
    mtime: int = 0
    size: int = 0
    target: str | None = None
    digest: bytes | None = None
    chunks: tuple[bytes, ...] = ()


def encode_rows(
    rows: Iterable[Row],
    *,
    chunk_size: int = CHUNK,
    root_mode: int = 0o755,
    count: int | None = None,
    lengths: dict[int, int] | None = None,
) -> bytes:
    """The v1 layout from ``rows`` as given (order, kinds, modes, sizes): ``count``
    overrides the header's entry count and ``lengths`` the length prefix of columns (by
    index 0-7), to lie about either."""
    rows = list(rows)
    linkish = ("l", "h")
    cols = [
        "".join(r.kind for r in rows).encode(),
        struct.pack(f"<{len(rows)}H", *(r.mode for r in rows)),
        struct.pack(f"<{len(rows)}q", *(r.mtime for r in rows)),
        struct.pack(f"<{len(rows)}Q", *(r.size for r in rows)),
        "\0".join(r.path for r in rows).encode(),
        "\0".join(r.target or "" for r in rows if r.kind in linkish).encode(),
        b"".join(r.digest for r in rows if r.digest is not None),
        b"".join(c for r in rows for c in r.chunks),
    ]
    n = len(rows) if count is None else count
    header = _HEADER.pack(b"LZCAFMAN", 1, 0, chunk_size, root_mode, 0, n)
    lengths = lengths or {}
    return header + b"".join(
        struct.pack("<Q", lengths.get(i, len(c))) + c for i, c in enumerate(cols)
    )


@dataclass(frozen=True)
class Expect:
    """What a door answers for an accepted case: an exit code (None: any but 0) and a
    piece of its one line on stderr."""

    code: int | None
    says: str = ""


@dataclass(frozen=True)
class Hostile:
    """One hostile manifest.

    ``rejected``: a piece of the decoder's message (None: the manifest decodes). ``entry``:
    the entry the message must name. ``cat``: (path, what ``lazycaf cat`` answers).
    ``materialize``: what ``lazycaf materialize`` answers. ``unreadable``: files whose
    reads through a mount must fail with EIO; ``readable``: files whose bytes a mount and
    ``cat`` must serve exactly (path -> content).
    """

    name: str
    data: bytes
    rejected: str | None = None
    entry: str | None = None
    blobs: dict[Digest, bytes] = field(default_factory=dict)
    cat: tuple[str, Expect] | None = None
    materialize: Expect = Expect(0)
    unreadable: tuple[str, ...] = ()
    readable: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # symlinks a mount must show as is
    rows: tuple[Row, ...] = ()  # an accepted case's entries (for ``combined``)
    truth: dict[str, bytes] = field(default_factory=dict)  # what a lying file's blobs hold

    @property
    def digest(self) -> Digest:
        return Digest.of(self.data)

    @property
    def ref(self) -> str:
        return f"hostile/{self.name}"


def _dir(path: str, mode: int = 0o755) -> Row:
    return Row(path, "d", mode)


def _file(path: str, content: bytes, *, mode: int = 0o644, size: int | None = None) -> Row:
    """A file row for ``content`` (its digest and chunks); ``size`` lies about its length."""
    declared = len(content) if size is None else size
    chunks: tuple[bytes, ...] = ()
    if len(content) > CHUNK:
        chunks = tuple(Digest.of(content[i : i + CHUNK]).raw for i in range(0, len(content), CHUNK))
    return Row(path, "f", mode, 0, declared, digest=Digest.of(content).raw, chunks=chunks)


def _link(path: str, target: str) -> Row:
    return Row(path, "l", 0, 0, len(target.encode()), target=target)


def _hard(path: str, target: str) -> Row:
    return Row(path, "h", 0, 0, 0, target=target)


def _blobs(*contents: bytes) -> dict[Digest, bytes]:
    out: dict[Digest, bytes] = {}
    for c in contents:
        out[Digest.of(c)] = c
        if len(c) > CHUNK:
            for i in range(0, len(c), CHUNK):
                out[Digest.of(c[i : i + CHUNK])] = c[i : i + CHUNK]
    return out


OK = b"an honest file\n"


def rejected_cases(outside: Path) -> list[Hostile]:
    """Manifests the decoder must refuse, each naming its bad entry."""
    out = str(outside).lstrip("/")
    deep = [f"{i:03d}" + "d" * 197 for i in range(21)]  # 21 x 201 bytes: 4,220
    deep_dirs = ["/".join(deep[: i + 1]) for i in range(len(deep))]
    ok = _file("ok", OK)

    def case(name: str, rows: list[Row], rejected: str, entry: str | None, **kw: Any) -> Hostile:
        return Hostile(name, encode_rows(rows, **kw), rejected, entry, blobs=_blobs(OK))

    big = bytes(range(256)) * 1024  # 256 KiB: 4 chunks
    return [
        case("traversal", [_file("../evil", OK), ok], "'..' component", "../evil"),
        case(
            "traversal-deep",
            [_dir("a"), _file("a/../../" + out + "/evil", OK), ok],
            "'..' component",
            "a/../../" + out + "/evil",
        ),
        case(
            "absolute", [_file(f"/{out}/evil", OK), ok], "leading or trailing '/'", f"/{out}/evil"
        ),
        case(
            "symlinked-parent-absolute",
            [_link("esc", "/" + out), _file("esc/evil", OK), ok],
            "parent directory missing",
            "esc/evil",
        ),
        case(
            "symlinked-parent-relative",
            [_dir("a"), _link("a/up", "../../" + out), _file("a/up/evil", OK), ok],
            "parent directory missing",
            "a/up/evil",
        ),
        case(
            "hardlink-outside-absolute",
            [_hard("evil", f"/{out}/victim"), ok],
            "not an earlier file",
            "evil",
        ),
        case(
            "hardlink-outside-relative",
            [_hard("evil", f"../{out}/victim"), ok],
            "not an earlier file",
            "evil",
        ),
        case("hardlink-to-directory", [_dir("d"), _hard("e", "d"), ok], "not an earlier file", "e"),
        case(
            "hardlink-to-symlink",
            [_link("l", "ok"), _hard("m", "l"), ok],
            "not an earlier file",
            "m",
        ),
        case("hardlink-to-later-file", [_hard("a", "ok"), ok], "not an earlier file", "a"),
        case("duplicate", [ok, ok], "duplicate or out of order", "ok"),
        case(
            "duplicate-dir-and-file",
            [_dir("x"), _file("x", OK)],
            "duplicate or out of order",
            "x",
        ),
        case("unsorted", [_file("b", OK), _file("a", OK)], "duplicate or out of order", "a"),
        case(
            "char-device-bits",
            [Row("dev", "f", 0o20666, 0, 0, digest=Digest.of(b"").raw)],
            "more than permission bits",
            "dev",
        ),
        case("block-device-kind", [Row("sda", "b", 0o660), ok], "unknown kind 'b'", "sda"),
        case("char-device-kind", [Row("tty", "c", 0o620), ok], "unknown kind 'c'", "tty"),
        case("fifo-kind", [Row("fifo", "p", 0o644), ok], "unknown kind 'p'", "fifo"),
        case("root-mode-type-bits", [ok], "root: mode", None, root_mode=0o40755),
        case("name-over-255-bytes", [_file("n" * 256, OK), ok], "name of 256 bytes", "n" * 256),
        case(
            "utf8-name-over-255-bytes",
            [_file("é" * 128, OK), ok],
            "name of 256 bytes",
            "é" * 128,
        ),
        case(
            "path-over-4095-bytes",
            [*(_dir(p) for p in deep_dirs), ok],
            "path of 4220 bytes",
            None,  # named, but shortened to keep the line short
        ),
        case(
            "size-needs-more-chunks",
            [_file("big", big, size=len(big) + CHUNK)],
            "chunk list shorter",
            "big",
        ),
        case(
            "size-needs-fewer-chunks",
            [_file("big", big, size=len(big) - CHUNK)],
            "chunk digests left over",
            "big",
        ),
        case(
            "small-size-with-chunks",
            [_file("big", big, size=100)],
            "chunk digests",
            None,
        ),
        case(
            "empty-file-with-content-digest",
            [_file("empty", OK, size=0), ok],
            f"size 0, but {Digest.of(OK)} is not the empty blob",
            "empty",
        ),
        case("huge-entry-count", [ok], "column lengths disagree", None, count=(1 << 32) - 1),
        case("huge-column-length", [ok], "truncated", None, lengths={4: (1 << 64) - 1}),
        case("symlink-size-lies", [Row("l", "l", 0, 0, 99, target="ok"), ok], "symlink", "l"),
        case("empty-name", [_dir("a"), _file("a//x", OK)], "empty component", "a//x"),
    ]


def accepted_cases(outside: Path) -> list[Hostile]:
    """Valid manifests that lie about what only blobs or the filesystem reveal."""
    out = str(outside)
    long_target = "t" * 5000
    two_chunks = bytes(range(256)) * 512  # 128 KiB: 2 chunks of 64 KiB
    files = {"ok": OK, "sub/ok2": OK + b"two\n"}
    honest = [_dir("sub"), _file("ok", OK), _file("sub/ok2", files["sub/ok2"])]
    blobs = _blobs(OK, files["sub/ok2"])
    many = 100_000  # chunks of a file none of which is stored
    missing = Row(
        "missing",
        "f",
        0o644,
        0,
        many * CHUNK,
        digest=Digest.of(b"missing whole").raw,
        chunks=tuple(Digest.of(i.to_bytes(4, "little")).raw for i in range(many)),
    )
    first_missing = Digest.from_bytes(missing.chunks[0]).hex
    integrity = Expect(4, "the manifest says")

    def case(name: str, rows: list[Row], **kw: object) -> Hostile:
        rows = sorted([*honest, *rows], key=lambda r: r.path)
        return Hostile(
            name,
            encode_rows(rows),
            readable=files,
            rows=tuple(rows),
            **kw,  # type: ignore[arg-type]
        )

    return [
        case(
            "size-larger-than-blob",
            [_file("lies", OK, size=len(OK) + 100)],
            blobs=_blobs(OK) | blobs,
            cat=("lies", integrity),
            materialize=integrity,
            unreadable=("lies",),
            truth={"lies": OK},
        ),
        case(
            "size-smaller-than-blob",
            [_file("lies", OK, size=len(OK) - 5)],
            blobs=_blobs(OK) | blobs,
            cat=("lies", integrity),
            materialize=integrity,
            unreadable=("lies",),
            truth={"lies": OK},
        ),
        case(
            "last-chunk-shorter-than-blob",
            [_file("lies", two_chunks, size=len(two_chunks) - 1)],
            blobs=_blobs(two_chunks) | blobs,
            cat=("lies", integrity),
            materialize=integrity,
            unreadable=("lies",),
            truth={"lies": two_chunks},
        ),
        case(
            "symlinks-leave-the-tree",
            [
                _link("abs", out + "/victim"),
                _link("up", "../../../../../../../../../.." + out + "/victim"),
                _link("sub/loop", "loop"),
            ],
            blobs=blobs,
            cat=("up", Expect(1, "no such path")),
            links={"abs": out + "/victim", "sub/loop": "loop"},
        ),
        case(
            "symlink-target-5000-bytes",
            [_link("long", long_target)],
            blobs=blobs,
            cat=("long", Expect(1, "no such path")),
            materialize=Expect(None, "long"),
        ),
        case(
            "setuid-and-world-writable",
            [
                _file("suid", OK, mode=0o4755),
                _file("sgid", OK, mode=0o2755),
                _dir("open", 0o777),
            ],
            blobs=blobs,
            cat=("suid", Expect(0)),
            truth={"suid": OK},
        ),
        case(
            "100000-missing-chunks",
            [missing],
            blobs=blobs,
            cat=("missing", Expect(1, first_missing)),
            materialize=Expect(1, first_missing),
            unreadable=("missing",),
        ),
    ]


def cases(outside: Path) -> list[Hostile]:
    return [*rejected_cases(outside), *accepted_cases(outside)]


def combined(accepted: list[Hostile]) -> Hostile:
    """Every accepted case in one manifest, each under a directory named after it (one
    mount serves them all). Relative symlinks keep their targets: they get one more
    directory to climb, which only matters to ``..`` chains long enough anyway."""

    def moved(prefix: str, r: Row) -> Row:
        target = f"{prefix}/{r.target}" if r.kind == "h" and r.target else r.target
        return r._replace(path=f"{prefix}/{r.path}", target=target)

    rows = [_dir(c.name) for c in accepted]
    rows += [moved(c.name, r) for c in accepted for r in c.rows]
    rows.sort(key=lambda r: r.path)

    def each(attr: str) -> dict[str, object]:
        return {f"{c.name}/{k}": v for c in accepted for k, v in getattr(c, attr).items()}

    return Hostile(
        "combined",
        encode_rows(rows),
        blobs={d: b for c in accepted for d, b in c.blobs.items()},
        unreadable=tuple(f"{c.name}/{p}" for c in accepted for p in c.unreadable),
        readable=each("readable"),  # type: ignore[arg-type]
        links=each("links"),  # type: ignore[arg-type]
        truth=each("truth"),  # type: ignore[arg-type]
        rows=tuple(rows),
    )


def store(cas_dir: Path, case: Hostile) -> Digest:
    """Write ``case``'s blobs and manifest into the CAS directory; the ref ``case.ref``
    names the manifest. Returns the manifest's digest."""
    cas = CasDir(cas_dir)
    cas.write_many([*case.blobs.items(), (case.digest, case.data)])
    cas.write_ref(case.ref, case.digest)
    return case.digest
