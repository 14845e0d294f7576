"""Read-outs straight from a manifest's columns (pure): ``ls`` lines and diffs that make an
``Entry`` only for the entries they print, so ``ls -R`` and ``diff`` of 10^6 entries hold
the decoded columns and little else (``decode_columns``; no object per entry beyond the
path strings validation needs).
"""

from __future__ import annotations

import stat
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import compress, count, repeat
from operator import eq, floordiv, ge, itemgetter, mod, ne, not_, or_
from typing import Final, TypeVar

from lazycaf.core.digest import DIGEST_SIZE, Digest
from lazycaf.core.errors import PathNotFound
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, ManifestColumns

__all__ = ["Columns", "changed_pairs", "ls_lines", "new_blob_bytes"]

T = TypeVar("T")

_MASKS: Final = {
    k: bytes(int(c == ord(k)) for c in range(256)) for k in (DIR, FILE, SYMLINK, HARDLINK)
}


class Columns:
    """A decoded manifest (``ManifestColumns``) with the lookups read-outs need.

    Invariant: nothing here holds an object per entry beyond the columns themselves, except
    the per-entry lists ``rows`` makes while a diff runs."""

    def __init__(self, c: ManifestColumns) -> None:
        self.c = c
        self.n = len(c.kinds)
        self.big = {i: (start, end) for i, start, end in c.chunk_bounds}
        self.link_targets = dict(zip(c.links, c.targets, strict=True))
        self._rows: tuple[list[object], ...] | None = None
        self._files: list[int] | None = None

    def file_indices(self) -> list[int]:
        """The entry index of each file, by rank (made once, when asked)."""
        if self._files is None:
            self._files = list(compress(range(self.n), self.mask(FILE)))
        return self._files

    def mask(self, kind: str) -> bytes:
        return self.c.kinds.encode("ascii").translate(_MASKS[kind])

    def find(self, path: str) -> int | None:
        i = bisect_left(self.c.paths, path)
        return i if i < self.n and self.c.paths[i] == path else None

    def entries(self, indices: Iterable[int]) -> Iterator[Entry]:
        """The entries at ``indices`` (ascending), each as ``Manifest.entries`` holds it."""
        kinds, rank, at = self.c.kinds, 0, 0
        for i in indices:
            rank += kinds.count(FILE, at, i)
            at = i
            yield self._entry(i, rank)

    def _entry(self, i: int, rank: int) -> Entry:
        c = self.c
        kind, path = c.kinds[i], c.paths[i]
        if kind == FILE:
            digest = Digest.trusted(c.digests[rank * DIGEST_SIZE : (rank + 1) * DIGEST_SIZE])
            chunks: tuple[Digest, ...] = ()
            if i in self.big:
                start, end = self.big[i]
                chunks = tuple(Digest.trusted_column(c.chunks[start:end]))
            return Entry(path, kind, c.modes[i], c.mtimes[i], c.sizes[i], digest, chunks)
        if kind == HARDLINK:
            f = c.hard_link_files[i]
            (file,) = self.entries([f])
            return file._replace(path=path, kind=HARDLINK, target=c.paths[f])
        if kind == SYMLINK:
            return Entry(path, kind, 0o777, c.mtimes[i], c.sizes[i], target=self.link_targets[i])
        return Entry(path, kind, c.modes[i], c.mtimes[i], c.sizes[i])

    def nlinks(self) -> tuple[Counter[str], Counter[str]]:
        """Subdirectories per directory path and hard links per file path."""
        subdirs = Counter(p.rpartition("/")[0] for p in compress(self.c.paths, self.mask(DIR)))
        links = Counter(self.c.paths[f] for f in self.c.hard_link_files.values())
        return subdirs, links

    def rows(self) -> tuple[list[object], ...]:
        if self._rows is None:
            self._rows = self._make_rows()
        return self._rows

    def _make_rows(self) -> tuple[list[object], ...]:
        """Per-entry comparison columns with hard links resolved to their file: kind, mode,
        mtime, size, raw digest, raw chunk list, target (what ``Entry`` equality compares
        besides the path)."""
        c, n = self.c, self.n
        span = range(0, len(c.digests), DIGEST_SIZE)
        raws = map(
            c.digests.__getitem__,
            map(slice, span, range(DIGEST_SIZE, len(span) * DIGEST_SIZE + 1, DIGEST_SIZE)),
        )
        digs: list[object] = [None] * n
        deque(map(digs.__setitem__, compress(range(n), self.mask(FILE)), raws), maxlen=0)
        chunks: list[object] = [None] * n
        for i, (start, end) in self.big.items():
            chunks[i] = c.chunks[start:end]
        targets: list[object] = [None] * n
        for i, t in self.link_targets.items():
            targets[i] = t
        modes: list[object] = list(c.modes)
        mtimes: list[object] = list(c.mtimes)
        sizes: list[object] = list(c.sizes)
        for i, f in c.hard_link_files.items():
            modes[i], mtimes[i], sizes[i] = modes[f], mtimes[f], sizes[f]
            digs[i], chunks[i], targets[i] = digs[f], chunks[f], c.paths[f]
        return list(c.kinds), modes, mtimes, sizes, digs, chunks, targets


# -- ls ------------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _seconds_text(secs: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs))


@lru_cache(maxsize=256)
def _filemode(st_mode: int) -> str:
    return stat.filemode(st_mode)


def ls_lines(
    cols: Columns, path: str, *, recursive: bool, as_json: bool, digest: str
) -> Iterator[str]:
    """What ``lazycaf ls`` prints, line by line (the same lines ``format_ls`` and
    ``entry_json`` give for ``Manifest`` entries)."""
    from lazycaf.cli.readouts import entry_json  # one JSON record shape

    c = cols.c
    path = path.strip("/")
    at = cols.find(path) if path else None
    if path and at is None:
        raise PathNotFound(path, f"manifest {digest}")
    by_name = False
    if at is not None and c.kinds[at] != DIR:
        shown: range | list[int] = [at]
    else:
        prefix = path + "/" if path else ""
        lo = bisect_left(c.paths, prefix) if prefix else 0
        hi = bisect_left(c.paths, path + "0") if prefix else cols.n  # '0' follows '/'
        shown = range(lo, hi)
        if not recursive:
            tails = (p.find("/", len(prefix)) < 0 for p in c.paths[lo:hi])
            shown, by_name = list(compress(shown, tails)), True
    subdirs, links = cols.nlinks()
    if as_json:
        return (
            entry_json(e, _nlink(e.kind, e.path, e.target, subdirs, links))
            for e in cols.entries(shown)
        )
    return _text_lines(cols, shown, by_name, subdirs, links)  # a map: no generator frame a line


_FMT: Final = "{} {:3d} {:>12d} {}.{:09d} {}".format  # format_ls's line
_TYPE: Final = {
    DIR: stat.S_IFDIR,
    FILE: stat.S_IFREG,
    HARDLINK: stat.S_IFREG,
    SYMLINK: stat.S_IFLNK | 0o777,  # a symlink stores mode 0
}
_NS: Final = 1_000_000_000


def _text_lines(
    cols: Columns,
    shown: range | list[int],
    by_name: bool,
    subdirs: Counter[str],
    links: Counter[str],
) -> Iterator[str]:
    """``ls -l`` lines of the entries ``shown`` (ascending), column by column: per-entry
    Python work only for directories and links; the lines themselves are made by ``map``."""
    c, hard = cols.c, cols.c.hard_link_files

    def of(col: Sequence[T]) -> list[T]:
        return list(map(col.__getitem__, shown))

    kinds = of(c.kinds)
    st_modes = list(map(or_, map(_TYPE.__getitem__, kinds), of(c.modes)))
    sizes, mtimes, names = of(c.sizes), of(c.mtimes), of(c.paths)
    nlinks = [1] * len(kinds)
    for pos in compress(range(len(kinds)), map(ne, kinds, repeat(FILE))):
        kind, i = kinds[pos], shown[pos]
        if kind == DIR:
            nlinks[pos] = 2 + subdirs[names[pos]]
        elif kind == HARDLINK:
            r = hard[i]
            st_modes[pos] = stat.S_IFREG | c.modes[r]
            sizes[pos], mtimes[pos] = c.sizes[r], c.mtimes[r]
            nlinks[pos] = 1 + links[c.paths[r]]
    for path, extra in links.items():  # files with hard links
        at = cols.find(path)
        pos = bisect_left(shown, at) if at is not None else len(shown)
        if pos < len(shown) and shown[pos] == at:
            nlinks[pos] = 1 + extra
    if by_name:
        names = list(map(itemgetter(2), map(str.rpartition, names, repeat("/"))))
    for pos in compress(range(len(kinds)), map(eq, kinds, repeat(SYMLINK))):
        names[pos] += " -> " + cols.link_targets[shown[pos]]
    secs = map(_seconds_text, map(floordiv, mtimes, repeat(_NS)))
    fracs = map(mod, mtimes, repeat(_NS))
    return map(_FMT, map(_filemode, st_modes), nlinks, sizes, secs, fracs, names)


def _nlink(
    kind: str, path: str, target: str | None, subdirs: Counter[str], links: Counter[str]
) -> int:
    if kind == DIR:
        return 2 + subdirs[path]
    if kind == FILE:
        return 1 + links[path]
    if kind == HARDLINK:
        return 1 + links[target or ""]
    return 1


# -- diff ----------------------------------------------------------------------------------
def changed_pairs(
    a: Columns, b: Columns, *, mtimes: bool = True
) -> tuple[list[int], list[int], list[tuple[int, int]], int]:
    """Removed (indices in ``a``), added (in ``b``), the pairs of entries at one path whose
    entries differ, and how many pairs differ only in their mtime. ``mtimes=False`` leaves
    those pairs out of the list (only counted), so a fresh build of an unchanged tree makes
    no object per entry. Whole-column work: set membership and row comparison in C."""
    pa, pb = a.c.paths, b.c.paths
    if pa == pb:
        meaningful, by_mtime = _aligned_differ(a, b)
        only = by_mtime - meaningful
        listed = meaningful | only if mtimes else meaningful
        return [], [], [(i, i) for i in sorted(listed)], 0 if mtimes else len(only)
    sa, sb = set(pa), set(pb)
    in_b, in_a = list(map(sb.__contains__, pa)), list(map(sa.__contains__, pb))
    del sa, sb
    removed = list(compress(range(a.n), map(not_, in_b)))
    added = list(compress(range(b.n), map(not_, in_a)))
    common_a = list(compress(range(a.n), in_b))
    common_b = list(compress(range(b.n), in_a))
    ra, rb = a.rows(), b.rows()
    rows_a = zip(*(col for k, col in enumerate(ra) if k != _MTIME), strict=True)
    rows_b = zip(*(col for k, col in enumerate(rb) if k != _MTIME), strict=True)
    differ = set(compress(count(), map(ne, compress(rows_a, in_b), compress(rows_b, in_a))))
    mtime_differ = compress(
        count(), map(ne, compress(ra[_MTIME], in_b), compress(rb[_MTIME], in_a))
    )
    mtime_only = set(mtime_differ) - differ
    ranks = sorted(differ | mtime_only) if mtimes else sorted(differ)
    pairs = [(common_a[k], common_b[k]) for k in ranks]
    return removed, added, pairs, 0 if mtimes else len(mtime_only)


_MTIME: Final = 2  # the mtime column of ``Columns.rows``


def _aligned_differ(a: Columns, b: Columns) -> tuple[set[int], set[int]]:
    """For two manifests with the same paths: the indices whose entries differ in anything
    but the mtime, and those whose mtime differs. Each column is compared whole first, and
    only a column that differs is compared entry by entry."""
    ca, cb = a.c, b.c
    if ca.hard_link_files or cb.hard_link_files or ca.kinds != cb.kinds:
        return _rows_differ(a, b)  # resolved rows: a hard link shows its file's fields
    out: set[int] = set()
    for col_a, col_b in ((ca.modes, cb.modes), (ca.sizes, cb.sizes)):
        if col_a != col_b:
            out.update(compress(count(), map(ne, col_a, col_b)))
    if ca.digests != cb.digests:
        out.update(map(a.file_indices().__getitem__, _differing(ca.digests, cb.digests)))
    if ca.chunks != cb.chunks or ca.chunk_bounds != cb.chunk_bounds:
        for i in a.big.keys() | b.big.keys():
            if a.big.get(i) is None or b.big.get(i) is None:
                out.add(i)
                continue
            (sa, ea), (sb, eb) = a.big[i], b.big[i]
            if ca.chunks[sa:ea] != cb.chunks[sb:eb]:
                out.add(i)
    if ca.targets != cb.targets:
        out.update(i for i in a.link_targets if a.link_targets[i] != b.link_targets[i])
    by_mtime: set[int] = set()
    if ca.mtimes != cb.mtimes:
        by_mtime.update(compress(count(), map(ne, ca.mtimes, cb.mtimes)))
    return out, by_mtime


def _rows_differ(a: Columns, b: Columns) -> tuple[set[int], set[int]]:
    out: set[int] = set()
    by_mtime: set[int] = set()
    for k, (col_a, col_b) in enumerate(zip(a.rows(), b.rows(), strict=True)):
        if col_a != col_b:
            (by_mtime if k == _MTIME else out).update(compress(count(), map(ne, col_a, col_b)))
    return out, by_mtime


def _differing(col_a: bytes, col_b: bytes, *, block: int = 64) -> Iterator[int]:
    """Ranks of the digests that differ between two digest columns of one length: blocks of
    ``block`` digests are compared whole, digests only inside a block that differs."""
    step = block * DIGEST_SIZE
    for off in range(0, len(col_a), step):
        if col_a[off : off + step] != col_b[off : off + step]:
            for k in range(off, min(off + step, len(col_a)), DIGEST_SIZE):
                if col_a[k : k + DIGEST_SIZE] != col_b[k : k + DIGEST_SIZE]:
                    yield k // DIGEST_SIZE


_FIND_AT_MOST: Final = 64  # candidates looked up one by one; more: one set of a's blobs


def new_blob_bytes(a: Columns, b: Columns, entries_b: Iterable[Entry]) -> int:
    """Bytes of the blobs ``b`` needs that ``a`` does not (each blob once), given the
    entries of ``b`` added or changed since ``a``: any other entry of ``b`` is in ``a`` as it
    is, and so are its blobs."""
    cs = b.c.chunk_size
    wanted: dict[bytes, int] = {}
    for e in entries_b:
        if e.digest is None:
            continue
        spans = (
            [e.size] if not e.chunks else [min(cs, e.size - j * cs) for j in range(len(e.chunks))]
        )
        for d, length in zip(e.chunks or (e.digest,), spans, strict=True):
            wanted[d.raw] = length
    if len(wanted) > _FIND_AT_MOST:
        have = _blob_set(a)
        return sum(n for d, n in wanted.items() if d not in have)
    return sum(n for d, n in wanted.items() if not _has_blob(a, d))


def _has_blob(cols: Columns, raw: bytes) -> bool:
    """Whether ``raw`` names a blob of ``cols``: a file at most a chunk long, or a chunk."""
    c = cols.c
    at = c.chunks.find(raw)
    while at >= 0:
        if at % DIGEST_SIZE == 0:
            return True
        at = c.chunks.find(raw, at + 1)
    at = c.digests.find(raw)
    while at >= 0:
        if at % DIGEST_SIZE == 0:
            i = cols.file_indices()[at // DIGEST_SIZE]
            if i not in cols.big:
                return True
        at = c.digests.find(raw, at + 1)
    return False


def _blob_set(cols: Columns) -> set[bytes]:
    c = cols.c
    n = len(c.digests)
    digests = map(
        c.digests.__getitem__,
        map(slice, range(0, n, DIGEST_SIZE), range(DIGEST_SIZE, n + DIGEST_SIZE, DIGEST_SIZE)),
    )
    sizes = compress(c.sizes, cols.mask(FILE))
    out = set(compress(digests, map(ge, repeat(c.chunk_size), sizes)))
    for start, end in cols.big.values():
        out.update(c.chunks[k : k + DIGEST_SIZE] for k in range(start, end, DIGEST_SIZE))
    return out
