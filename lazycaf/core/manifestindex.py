"""The manifest index: a validated manifest laid out for lookups without decoding it (pure).

A mount needs a manifest's entries one at a time (a lookup, a getattr, a read), never all of
them as Python objects. ``build_index`` validates canonical manifest bytes once (with
``decode_columns``: it refuses whatever ``Manifest.decode`` refuses) and lays the columns out
with what lookups need, in one flat buffer; ``ManifestIndex`` answers from such a buffer (a
``bytes``, or an ``mmap`` of a file shared by every mount of the executable on a host) with
array reads, building an ``Entry`` only for the entry asked. Opening checks the header, the
manifest digest it was built from and a blake3 checksum of the body, so a torn or foreign
file is refused (``ManifestError``), never served; the caller then builds it again.

Layout (native byte order and alignment: the index is a host-local cache, never shared
between machines; an endianness mark in the header refuses a foreign one)::

    header  b"LZCAFIDX" | u16 version | u16 0 | u32 0x01020304 | u32 chunk_size
            | u32 root_mode | i64 root_mtime_ns | u32 n | u32 links | u32 files
            | 32 manifest digest | 32 blake3 of the body | 18 x (u64 offset, u64 length)
    body    the sections below, each 8-byte aligned

Entry ``i`` is inode ``i + 2``, the root is inode 1; a hard link answers as its file's inode.

    kinds      n bytes (d f l h)              modes      n x u16 (as stored: 0 for links)
    mtimes     n x i64                        sizes      n x u64 (as stored)
    paths      the UTF-8 paths, NUL-joined    path_at    n + 1 x u64: path i starts at
                                                         path_at[i], ends at path_at[i+1] - 1
    name_at    n x u16: where the last name starts within path i
    aux        n x u32: a file's rank among files, a link's among links, else 0
    targets    the link targets, NUL-joined   target_at  links + 1 x u64
    digests    files x 32 bytes               chunk_at   files + 1 x u64 (chunk digests of
    chunks     the chunk digests                         file k: chunk_at[k] .. [k+1])
    inode_of   n x u32                        nlink      n + 2 x u32, by inode
    child_at   n + 3 x u32, by inode          children   n x u32 entry indices, by parent
                                                         inode, each directory's in name order
"""

from __future__ import annotations

import stat
import struct
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Mapping
from itertools import accumulate, compress, repeat
from operator import itemgetter
from typing import Any, Final

from lazycaf.core.digest import DIGEST_SIZE, Digest
from lazycaf.core.errors import ManifestError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, decode_columns

__all__ = ["BODY_AT", "ROOT_INODE", "ManifestIndex", "build_index"]

ROOT_INODE: Final = 1
MAGIC: Final = b"LZCAFIDX"
VERSION: Final = 1
_ENDIAN: Final = 0x01020304
_SECTIONS: Final[tuple[tuple[str, Any], ...]] = (  # name, memoryview format
    ("kinds", "B"),
    ("modes", "H"),
    ("mtimes", "q"),
    ("sizes", "Q"),
    ("paths", "B"),
    ("path_at", "Q"),
    ("name_at", "H"),
    ("aux", "I"),
    ("targets", "B"),
    ("target_at", "Q"),
    ("digests", "B"),
    ("chunk_at", "Q"),
    ("chunks", "B"),
    ("inode_of", "I"),
    ("nlink", "I"),
    ("child_at", "I"),
    ("children", "I"),
)
_HEAD: Final = struct.Struct(f"=8sHHIIIqIII32s32s{2 * len(_SECTIONS)}Q")
BODY_AT: Final = -(-_HEAD.size // 8) * 8  # the header padded: every section 8-byte aligned


def _mask(kind: str, kinds: str) -> bytes:
    return kinds.encode("ascii").translate(bytes(int(c == ord(kind)) for c in range(256)))


def build_index(data: bytes, *, digest: Digest, name: str = "manifest") -> bytes:
    """The index of canonical manifest bytes ``data`` (whose digest is ``digest``).
    ``ManifestError`` for anything ``Manifest.decode`` would refuse."""
    c = decode_columns(data, name=name)
    n, kinds, paths = len(c.kinds), c.kinds, c.paths
    files = kinds.count(FILE)
    path_bytes = "\0".join(paths).encode()
    path_at = array("Q", accumulate((len(p.encode()) + 1 for p in paths), initial=0))
    split = list(map(str.rpartition, paths, repeat("/")))
    parents = list(map(itemgetter(0), split))
    name_at = array("H", (len(p.encode()) + 1 if p else 0 for p in parents))
    aux = array("I", bytes(4 * n))
    for k, i in enumerate(compress(range(n), _mask(FILE, kinds))):
        aux[i] = k
    for k, i in enumerate(c.links):
        aux[i] = k
    targets = [t.encode() for t in c.targets]
    target_at = array("Q", accumulate((len(t) + 1 for t in targets), initial=0))
    chunk_at = array("Q", repeat(0, files + 1))
    big = {i: (start, end) for i, start, end in c.chunk_bounds}
    pos = 0
    for k, i in enumerate(compress(range(n), _mask(FILE, kinds))):
        if i in big:
            pos = big[i][1] // DIGEST_SIZE
        chunk_at[k + 1] = pos
    inode_of = array("I", range(2, n + 2))
    for i, f in c.hard_link_files.items():
        inode_of[i] = f + 2
    dir_inode = {p: i + 2 for i, p in enumerate(paths) if kinds[i] == DIR}
    dir_inode[""] = ROOT_INODE
    parent_inode = list(map(dir_inode.__getitem__, parents))
    nlink = array("I", repeat(1, n + 2))
    nlink[ROOT_INODE] = 2
    for i in compress(range(n), _mask(DIR, kinds)):
        nlink[i + 2] = 2
    for p in compress(parent_inode, _mask(DIR, kinds)):
        nlink[p] += 1
    for f in c.hard_link_files.values():
        nlink[f + 2] += 1
    counts = Counter(parent_inode)
    child_at = array("I", accumulate((counts.get(ino, 0) for ino in range(n + 2)), initial=0))
    children = array("I", sorted(range(n), key=parent_inode.__getitem__))  # stable: name order
    sections: dict[str, bytes] = {
        "kinds": kinds.encode("ascii"),
        "modes": array("H", c.modes).tobytes(),
        "mtimes": array("q", c.mtimes).tobytes(),
        "sizes": array("Q", c.sizes).tobytes(),
        "paths": path_bytes,
        "path_at": path_at.tobytes(),
        "name_at": name_at.tobytes(),
        "aux": aux.tobytes(),
        "targets": b"\0".join(targets),
        "target_at": target_at.tobytes(),
        "digests": c.digests,
        "chunk_at": chunk_at.tobytes(),
        "chunks": c.chunks,
        "inode_of": inode_of.tobytes(),
        "nlink": nlink.tobytes(),
        "child_at": child_at.tobytes(),
        "children": children.tobytes(),
    }
    body = bytearray()
    table: list[int] = []
    for key, _ in _SECTIONS:
        body += bytes(-len(body) % 8)
        table += [BODY_AT + len(body), len(sections[key])]
        body += sections[key]
    links = len(c.links)
    head = _HEAD.pack(
        MAGIC,
        VERSION,
        0,
        _ENDIAN,
        c.chunk_size,
        c.root_mode,
        c.root_mtime_ns,
        n,
        links,
        files,
        digest.raw,
        Digest.of(body).raw,
        *table,
    )
    return head + bytes(BODY_AT - len(head)) + bytes(body)


class ManifestIndex:
    """A read-only view of an index buffer (see the module docstring).

    Invariants: the buffer was checked when opened (header, manifest digest, checksum) and
    is never written; every answer is computed from it, and nothing here holds an object per
    entry. ``buffer`` must outlive the view (an ``mmap`` is closed by its owner).
    """

    def __init__(
        self, buffer: bytes | memoryview, *, digest: Digest, body_checked: Digest | None = None
    ) -> None:
        """Open ``buffer`` as the index of manifest ``digest``; ``ManifestError`` when it is
        not one (wrong magic, version or machine, another manifest, a torn or changed body).
        ``body_checked``: the blake3 of the body as the caller read it from the same file
        (a mapped file is then not read through the mapping, whose pages would count in
        the process's RSS); it must match the header's like the body's own hash would."""
        view = memoryview(buffer)
        if len(view) < BODY_AT:
            raise ManifestError("manifest index: truncated header")
        head = _HEAD.unpack_from(view)
        magic, version, flags, endian = head[:4]
        if magic != MAGIC or version != VERSION or flags or endian != _ENDIAN:
            raise ManifestError("manifest index: not a version 1 index for this machine")
        self.chunk_size: int = head[4]
        self.root_mode: int = head[5]
        self.root_mtime_ns: int = head[6]
        self.n: int = head[7]
        self._nlinks: int = head[8]
        self._nfiles: int = head[9]
        if head[10] != digest.raw:
            raise ManifestError(f"manifest index: built for another manifest than {digest}")
        body = body_checked if body_checked is not None else Digest.of(view[BODY_AT:])
        if body.raw != head[11]:
            raise ManifestError("manifest index: checksum mismatch (torn or changed)")
        self.digest = digest
        table = head[12:]
        cols: dict[str, memoryview] = {}
        for k, (key, fmt) in enumerate(_SECTIONS):
            start, length = table[2 * k], table[2 * k + 1]
            if start + length > len(view) or length % struct.calcsize(fmt):
                raise ManifestError(f"manifest index: section {key} out of bounds")
            cols[key] = view[start : start + length].cast(fmt)
        self._kinds = cols["kinds"].tobytes().decode("ascii")
        self._modes, self._mtimes, self._sizes = cols["modes"], cols["mtimes"], cols["sizes"]
        self._paths, self._path_at, self._name_at = cols["paths"], cols["path_at"], cols["name_at"]
        self._aux, self._targets, self._target_at = cols["aux"], cols["targets"], cols["target_at"]
        self._digests, self._chunk_at, self._chunks = (
            cols["digests"],
            cols["chunk_at"],
            cols["chunks"],
        )
        self._inode_of, self._nlink = cols["inode_of"], cols["nlink"]
        self._child_at, self._children = cols["child_at"], cols["children"]
        self._check_shape()

    def _check_shape(self) -> None:
        n = self.n
        expect = {
            "kinds": (self._kinds, n),
            "modes": (self._modes, n),
            "mtimes": (self._mtimes, n),
            "sizes": (self._sizes, n),
            "path_at": (self._path_at, n + 1),
            "name_at": (self._name_at, n),
            "aux": (self._aux, n),
            "target_at": (self._target_at, self._nlinks + 1),
            "digests": (self._digests, DIGEST_SIZE * self._nfiles),
            "chunk_at": (self._chunk_at, self._nfiles + 1),
            "inode_of": (self._inode_of, n),
            "nlink": (self._nlink, n + 2),
            "child_at": (self._child_at, n + 3),
            "children": (self._children, n),
        }
        for key, (col, length) in expect.items():
            if len(col) != length:
                raise ManifestError(f"manifest index: section {key} has the wrong length")

    def files_by_digest(self, wanted: set[bytes]) -> dict[str, Entry]:
        """The file entries whose digest (raw bytes) is in ``wanted``, by digest hex (of
        files with the same content, the last)."""
        out: dict[str, Entry] = {}
        if not wanted:
            return out
        digests = self._digests.tobytes()
        for k, i in enumerate(compress(range(self.n), _mask(FILE, self._kinds))):
            d = digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE]
            if d in wanted:
                out[d.hex()] = self.entry(i)
        return out

    def blob_bytes(self) -> int:
        """The bytes of the distinct blobs the tree's files need (no object kept per blob)."""
        cs, sizes, total = self.chunk_size, self._sizes, 0
        seen: set[bytes] = set()
        digests = self._digests.tobytes()
        for k, i in enumerate(compress(range(self.n), _mask(FILE, self._kinds))):
            size = sizes[i]
            if size <= cs:
                d = digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE]
                if d not in seen:
                    seen.add(d)
                    total += size
                continue
            lo = self._chunk_at[k]
            for j in range(self._chunk_at[k + 1] - lo):
                d = self._chunks[(lo + j) * DIGEST_SIZE : (lo + j + 1) * DIGEST_SIZE].tobytes()
                if d not in seen:
                    seen.add(d)
                    total += min(cs, size - j * cs)
        return total

    @classmethod
    def build(cls, data: bytes, *, name: str = "manifest") -> ManifestIndex:
        """Validate ``data`` and index it in memory (tests, and when no file can be written)."""
        digest = Digest.of(data)
        return cls(build_index(data, digest=digest, name=name), digest=digest)

    # -- entries by index --------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def kind(self, i: int) -> str:
        return self._kinds[i]

    def path_bytes(self, i: int) -> bytes:
        return self._paths[self._path_at[i] : self._path_at[i + 1] - 1].tobytes()

    def path(self, i: int) -> str:
        return self.path_bytes(i).decode()

    def name(self, i: int) -> bytes:
        """The last component of entry ``i``'s path, as bytes."""
        start = self._path_at[i]
        return self._paths[start + self._name_at[i] : self._path_at[i + 1] - 1].tobytes()

    def _target(self, i: int) -> str:
        k = self._aux[i]
        return self._targets[self._target_at[k] : self._target_at[k + 1] - 1].tobytes().decode()

    def entry(self, i: int) -> Entry:
        """Entry ``i`` as ``Manifest.entries[i]`` holds it (a hard link carries its file's
        mode, mtime, size, digest and chunks)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        kind = self._kinds[i]
        if kind == HARDLINK:
            f = self._inode_of[i] - 2
            return self.entry(f)._replace(path=self.path(i), kind=HARDLINK, target=self.path(f))
        if kind == FILE:
            k = self._aux[i]
            digest = Digest.trusted(
                self._digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE].tobytes()
            )
            lo, hi = self._chunk_at[k], self._chunk_at[k + 1]
            chunks = tuple(
                Digest.trusted_column(self._chunks[lo * DIGEST_SIZE : hi * DIGEST_SIZE].tobytes())
            )
            return Entry(
                self.path(i), kind, self._modes[i], self._mtimes[i], self._sizes[i], digest, chunks
            )
        if kind == SYMLINK:
            return Entry(
                self.path(i), kind, 0o777, self._mtimes[i], self._sizes[i], target=self._target(i)
            )
        return Entry(self.path(i), kind, self._modes[i], self._mtimes[i], self._sizes[i])

    def __iter__(self) -> Iterator[Entry]:
        """Every entry in manifest order, one at a time."""
        return map(self.entry, range(self.n))

    def find(self, path: str) -> int | None:
        """The index of the entry at ``path`` (no leading or trailing '/'), or None."""
        key = path.encode()
        i = bisect_left(range(self.n), key, key=self.path_bytes)
        return i if i < self.n and self.path_bytes(i) == key else None

    def get(self, path: str) -> Entry | None:
        i = self.find(path.strip("/"))
        return None if i is None else self.entry(i)

    @property
    def by_path(self) -> Mapping[str, Entry]:
        """A read-only mapping of path to entry, answered by binary search."""
        return _ByPath(self)

    # -- the tree, by inode ------------------------------------------------------------------
    def inode_of(self, i: int) -> int:
        return self._inode_of[i]

    def nlink(self, inode: int) -> int:
        return self._nlink[inode]

    def is_dir(self, inode: int) -> bool:
        return inode == ROOT_INODE or (2 <= inode < self.n + 2 and self._kinds[inode - 2] == DIR)

    def child_count(self, inode: int) -> int:
        return self._child_at[inode + 1] - self._child_at[inode]

    def child(self, inode: int, pos: int) -> int:
        """The entry index of the ``pos``-th child (in name order) of directory ``inode``."""
        return self._children[self._child_at[inode] + pos]

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The inode of ``name`` in directory ``parent``, None if absent (binary search)."""
        if not 0 < parent < self.n + 2:
            return None
        lo, hi = self._child_at[parent], self._child_at[parent + 1]
        pos = bisect_left(self._children, name, lo, hi, key=self.name)
        if pos < hi and self.name(self._children[pos]) == name:
            return self._inode_of[self._children[pos]]
        return None

    def children_of(self, i: int | None) -> Iterator[int]:
        """Entry indices of the children of entry ``i`` (None: the root), in name order."""
        inode = ROOT_INODE if i is None else i + 2
        lo, hi = self._child_at[inode], self._child_at[inode + 1]
        return iter(self._children[lo:hi])

    # -- whole-tree figures (column work, no entry objects) ----------------------------------
    def st_mode(self, i: int) -> int:
        kind = self._kinds[i]
        if kind == DIR:
            return stat.S_IFDIR | self._modes[i]
        if kind == SYMLINK:
            return stat.S_IFLNK | 0o777
        if kind == HARDLINK:
            return stat.S_IFREG | self._modes[self._inode_of[i] - 2]
        return stat.S_IFREG | self._modes[i]

    def stat(self, i: int) -> tuple[int, int, int]:
        """``(st_mode, size, mtime_ns)`` of entry ``i`` (a hard link: its file's)."""
        if self._kinds[i] == HARDLINK:
            i = self._inode_of[i] - 2
        return self.st_mode(i), self._sizes[i], self._mtimes[i]

    def file_bytes(self) -> int:
        """The sum of the file entries' sizes (each inode once)."""
        return sum(compress(self._sizes, _mask(FILE, self._kinds)))

    def blob_digest_column(self) -> tuple[memoryview, memoryview]:
        """The raw 32-byte digests of files (entry order) and of chunks: for whole-tree
        work that should not make an object per entry."""
        return self._digests, self._chunks

    def blobs(self) -> dict[Digest, int]:
        """Every distinct blob the tree's files need, with its size (``Manifest.blobs``)."""
        out: dict[Digest, int] = {}
        cs = self.chunk_size
        ranks = compress(range(self.n), _mask(FILE, self._kinds))
        digests = self._digests.tobytes()
        for k, i in enumerate(ranks):
            size = self._sizes[i]
            if size <= cs:
                out[Digest.trusted(digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE])] = size
                continue
            lo, hi = self._chunk_at[k], self._chunk_at[k + 1]
            col = self._chunks[lo * DIGEST_SIZE : hi * DIGEST_SIZE].tobytes()
            for j, d in enumerate(Digest.trusted_column(col)):
                out[d] = min(cs, size - j * cs)
        return out


class _ByPath(Mapping[str, Entry]):
    __slots__ = ("_index",)

    def __init__(self, index: ManifestIndex) -> None:
        self._index = index

    def __getitem__(self, path: str) -> Entry:
        i = self._index.find(path)
        if i is None:
            raise KeyError(path)
        return self._index.entry(i)

    def __iter__(self) -> Iterator[str]:
        return map(self._index.path, range(len(self._index)))

    def __len__(self) -> int:
        return len(self._index)
