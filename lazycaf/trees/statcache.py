"""What a pack learned about a tree's files, so the next pack hashes only what changed.

Like git's index: a file whose size, mtime, ctime, inode and device are as they were when it
was hashed keeps its digests. ctime moves on every write, even one that restores the mtime.
A file modified within ``_RACY_NS`` of the moment the cache was written may have changed in
the same timestamp tick, so it is hashed again ("racy git"). One file per tree root and
chunk size; losing or corrupting it only costs a full re-hash.

It also remembers the pack that wrote it: the store, the ref it set and the manifest digest
(``last_pack``). While that ref still names that manifest, every digest here is a blob the
store holds and a root keeps from its GC, so the next pack need not ask about them
(``lazycaf.trees.pack``).

Format: ``_MAGIC`` then ``marshal`` of ``(saved_ns, paths, keys, digests, chunk_lengths,
chunks, last_pack)``, one record per file in columns: ``paths`` joined by NUL, ``keys`` 40
bytes a file (``_KEY``: size, mtime, ctime, inode, device), ``digests`` 32 raw bytes a
file, ``chunk_lengths`` a u64 a file (the bytes of its chunk digests in ``chunks``, 0 for a
file of one blob), ``chunks`` the chunk digests joined; ``last_pack`` is ``(store, ref, raw
manifest digest)`` or None. The records are saved in the order the last pack's walk looked
them up, so the next walk finds each at the next position, not through a dict of every
path. At 300,000 files it loads in ~25 ms (a dict of a tuple per file, the format before:
~0.25 s, and 100 MB more). ``marshal`` is Python's own format; a file another Python
version cannot read, like any damaged one, is an empty cache; a file of the format before
(``_MAGIC_V3``, ``_MAGIC_V2``) is read into columns, its records of the wrong shape left
out.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import struct
import tempfile
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path
from typing import Final

from lazycaf.core.digest import DIGEST_SIZE, Digest
from lazycaf.core.lenumbers import from_le, to_le

__all__ = ["RawHashes", "StatCache", "StatKey", "default_stat_cache_dir", "pack_keys"]

StatKey = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, ino, dev
RawHashes = tuple[bytes, bytes]  # raw digest, raw chunk digests joined (b"": one blob)
LastPack = tuple[str, str, Digest]  # store (``CAS.where``), ref, manifest digest
_KEY: Final = struct.Struct("<QqqQQ")
_RACY_NS: Final = 2_000_000_000
_MAGIC: Final = b"LZCAFSTAT4\n"
_MAGIC_V3: Final = b"LZCAFSTAT3\n"  # {path: (key, digest, chunks)} and last_pack
_MAGIC_V2: Final = b"LZCAFSTAT2\n"  # the same without last_pack


def pack_keys(
    sizes: list[int], mtimes: list[int], ctimes: list[int], inos: list[int], devs: list[int]
) -> bytes:
    """Stat keys given as columns, packed as the cache stores them (what ``find_run``
    compares); ``struct.error`` for a value no key can hold."""
    return b"".join(map(_KEY.pack, sizes, mtimes, ctimes, inos, devs))


def default_stat_cache_dir() -> Path:
    return Path(os.environ.get("LAZYCAF_STATE") or Path.home() / ".cache" / "lazycaf" / "pack-stat")


class _Columns:
    """Records as columns (see the module's docstring); ``ends[i]``: where record ``i``'s
    chunk digests end in ``chunks``."""

    __slots__ = ("chunks", "digests", "ends", "keys", "lengths", "paths")

    def __init__(
        self, paths: list[str], keys: bytes, digests: bytes, lengths: array[int], chunks: bytes
    ) -> None:
        n = len(paths)
        if len(keys) != _KEY.size * n or len(digests) != DIGEST_SIZE * n or len(lengths) != n:
            raise ValueError("column lengths disagree")
        self.paths, self.keys, self.digests, self.lengths, self.chunks = (
            paths,
            keys,
            digests,
            lengths,
            chunks,
        )
        self.ends = array("Q", accumulate(lengths))
        if (self.ends[-1] if n else 0) != len(chunks):
            raise ValueError("chunk lengths disagree")

    @classmethod
    def empty(cls) -> _Columns:
        return cls([], b"", b"", array("Q"), b"")

    @classmethod
    def of_records(cls, files: dict[object, object]) -> _Columns:
        """The format before's ``{path: (key, digest, chunks)}``; records of the wrong shape
        are left out (a re-hash of those files)."""
        paths: list[str] = []
        keys: list[bytes] = []
        digests: list[bytes] = []
        chunks: list[bytes] = []
        lengths = array("Q")
        for path, rec in files.items():
            if type(path) is not str or type(rec) is not tuple or len(rec) != 3:
                continue
            key, raw, chunk_raws = rec
            if type(raw) is not bytes or len(raw) != DIGEST_SIZE:
                continue
            if type(chunk_raws) is not bytes or len(chunk_raws) % DIGEST_SIZE:
                continue
            try:
                packed = _KEY.pack(*key)
            except (TypeError, struct.error):
                continue
            paths.append(path)
            keys.append(packed)
            digests.append(raw)
            lengths.append(len(chunk_raws))
            chunks.append(chunk_raws)
        return cls(paths, b"".join(keys), b"".join(digests), lengths, b"".join(chunks))


class StatCache:
    """path -> (stat key, digest, chunk digests) for one tree root and chunk size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._old = _Columns.empty()
        self._index: dict[str, int] | None = None  # path -> record, built on the first jump
        self._next = 0  # where the next lookup looks first
        self._order: list[list[int] | str] = []  # the runs and the missed paths, in order
        self._forgotten: set[int] = set()  # found, then not carried over (``forget``)
        self._new: dict[str, tuple[bytes, bytes, bytes]] = {}  # recorded: key, digest, chunks
        self._trusted_before = 0
        self.hits = 0
        self.last_pack: LastPack | None = None  # the pack that wrote the file
        self._this_pack: LastPack | None = None
        with contextlib.suppress(OSError, ValueError, EOFError, TypeError):
            self._load(path.read_bytes())

    def _load(self, data: bytes) -> None:
        saved_ns, last = None, None
        if data.startswith(_MAGIC):
            saved_ns, paths, keys, digests, lengths_b, chunks, last = marshal.loads(
                memoryview(data)[len(_MAGIC) :]
            )
            if not isinstance(paths, str) or not all(
                type(b) is bytes for b in (keys, digests, lengths_b, chunks)
            ):
                return
            lengths = from_le("Q", lengths_b)
            columns = _Columns(paths.split("\0") if paths else [], keys, digests, lengths, chunks)
        elif data.startswith(_MAGIC_V3) or data.startswith(_MAGIC_V2):
            v3 = data.startswith(_MAGIC_V3)
            body = marshal.loads(memoryview(data)[len(_MAGIC_V3 if v3 else _MAGIC_V2) :])
            if not isinstance(body, tuple) or len(body) != (3 if v3 else 2):
                return
            saved_ns, files = body[0], body[1]
            last = body[2] if v3 else None
            if not isinstance(files, dict):
                return
            columns = _Columns.of_records(files)
        else:
            return
        if isinstance(saved_ns, int):
            self._old = columns
            self._trusted_before = saved_ns - _RACY_NS
            self.last_pack = _last_pack(last)

    @classmethod
    def for_tree(
        cls, cache_dir: Path, root: Path, chunk_size: int, *, variant: str = ""
    ) -> StatCache:
        """The cache of one tree packed one way (``variant``: e.g. ``normalize``, whose
        digests are of rewritten bytes)."""
        key = f"{root.resolve()}\0{chunk_size}" + (f"\0{variant}" if variant else "")
        name = Digest.of(key.encode()).hex[:32]
        return cls(cache_dir / f"{name}.stat")

    def lookup(self, rel: str, key: StatKey) -> RawHashes | None:
        """The file's digests as raw bytes, if its stat key is as recorded and not racy."""
        i = self.find(rel, key)
        return None if i is None else self.raw(i)

    def find(self, rel: str, key: StatKey) -> int | None:
        """The file's record, if its stat key is as recorded and not racy (``raw``: its
        digests). A missed file is saved by ``record``, in this lookup's place."""
        old = self._old
        i = self._next
        if i >= len(old.paths) or old.paths[i] != rel:
            found = self._position(rel)
            if found is None:
                self._order.append(rel)
                return None
            i = found
        self._next = i + 1
        at = _KEY.size * i
        try:
            same = old.keys[at : at + _KEY.size] == _KEY.pack(*key)
        except struct.error:  # no stat gives such a key: a miss
            same = False
        if not same or key[1] >= self._trusted_before:
            self._order.append(rel)
            return None
        self._hit(i, i + 1)
        return i

    def find_run(self, paths: list[str], keys: bytes, newest_mtime_ns: int) -> int | None:
        """The first of the records of ``paths`` (one directory's files, in the order the
        last walk asked about them) when each is as recorded: the paths and their packed
        stat keys (``keys``) equal to the saved run's, none racy. Else None, and nothing
        noted (the walk then asks file by file)."""
        old, n = self._old, len(paths)
        i = self._next
        if old.paths[i : i + n] != paths:
            found = self._position(paths[0]) if paths else None
            if found is None or old.paths[found : found + n] != paths:
                return None
            i = found
        if old.keys[_KEY.size * i : _KEY.size * (i + n)] != keys:
            return None
        if newest_mtime_ns >= self._trusted_before:
            return None
        self._next = i + n
        self._hit(i, i + n)
        return i

    def _position(self, rel: str) -> int | None:
        """Where ``rel``'s record is, when it is not at the next position (a dict of the
        paths, built on the first such jump)."""
        if self._index is None:
            self._index = {p: k for k, p in enumerate(self._old.paths)}
        return self._index.get(rel)

    def _hit(self, start: int, stop: int) -> None:
        run = self._order[-1] if self._order else None
        if isinstance(run, list) and run[1] == start:
            run[1] = stop
        else:
            self._order.append([start, stop])
        self.hits += stop - start

    def raw(self, i: int) -> RawHashes:
        """Record ``i``'s digest and chunk digests, raw."""
        old = self._old
        end = old.ends[i]
        return self.raw_digest(i), old.chunks[end - old.lengths[i] : end]

    def raw_digest(self, i: int) -> bytes:
        """Record ``i``'s digest, raw."""
        return self._old.digests[DIGEST_SIZE * i : DIGEST_SIZE * (i + 1)]

    @property
    def digest_column(self) -> bytes:
        """Every record's raw digest, joined: record ``i``'s at ``DIGEST_SIZE * i`` (what a
        loop over 300k records slices itself, without a call each)."""
        return self._old.digests

    def blobs(self, records: list[int]) -> set[bytes]:
        """The blobs of ``records``' files as raw digests: a file's own, or its chunks'."""
        old, n = self._old, DIGEST_SIZE
        d, lengths, ends, chunks = old.digests, old.lengths, old.ends, old.chunks
        out = {d[n * i : n * i + n] for i in records}
        for i in [i for i in records if lengths[i]] if chunks else []:
            out.discard(d[n * i : n * i + n])  # a chunked file's own digest is no blob
            out.update(chunks[at : at + n] for at in range(ends[i] - lengths[i], ends[i], n))
        return out

    def forget(self, i: int) -> None:
        """Record ``i``, found by this pack, is not saved again: its file was hashed anew
        (a ``.pyc`` rewritten under ``--normalize``), so the manifest this pack stores does
        not list the record's digest, and a record the last pack's manifest does not list
        must not be vouched for (``lazycaf.trees.pack`` trusts them to be in the store)."""
        self._forgotten.add(i)

    def record(self, rel: str, key: StatKey, digest: Digest, chunks: tuple[Digest, ...]) -> None:
        self._new[rel] = (_KEY.pack(*key), digest.raw, b"".join(c.raw for c in chunks))

    def remember_pack(self, store: str, ref: str, manifest: Digest) -> None:
        """What ``save`` records as ``last_pack``: this pack set ``ref`` in ``store``."""
        self._this_pack = (store, ref, manifest)

    def save(self) -> None:
        """Atomically replace the file with what this pack saw (files gone are dropped): the
        hits and the recorded files in the order they were looked up, then any recorded
        without a lookup."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last = self._this_pack
        saved = None if last is None else (last[0], last[1], last[2].raw)
        body = _MAGIC + marshal.dumps((time.time_ns(), *self._columns(), saved))
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # the JSON file of earlier versions
            self.path.with_suffix(".json").unlink()

    def _saved_order(self) -> Iterator[list[int] | str]:
        """``_order`` with the forgotten records cut out of its runs."""
        forgotten = sorted(self._forgotten)
        for item in self._order:
            if not forgotten or not isinstance(item, list):
                yield item
                continue
            start, stop = item
            at = bisect_left(forgotten, start)
            while at < len(forgotten) and forgotten[at] < stop:
                if start < forgotten[at]:
                    yield [start, forgotten[at]]
                start = forgotten[at] + 1
                at += 1
            if start < stop:
                yield [start, stop]

    def _columns(self) -> tuple[str, bytes, bytes, bytes, bytes]:
        old, new = self._old, dict(self._new)
        paths: list[str] = []
        keys, digests, chunks = [], [], []
        lengths = array("Q")
        for item in self._saved_order():
            if isinstance(item, list):  # a run of hits: slices of the old columns
                start, stop = item
                paths += old.paths[start:stop]
                keys.append(old.keys[_KEY.size * start : _KEY.size * stop])
                digests.append(old.digests[DIGEST_SIZE * start : DIGEST_SIZE * stop])
                lengths += old.lengths[start:stop]
                chunks.append(old.chunks[old.ends[start] - old.lengths[start] : old.ends[stop - 1]])
                continue
            rec = new.pop(item, None)
            if rec is not None:
                paths.append(item)
                keys.append(rec[0])
                digests.append(rec[1])
                lengths.append(len(rec[2]))
                chunks.append(rec[2])
        for path, (key, raw, chunk_raws) in new.items():
            paths.append(path)
            keys.append(key)
            digests.append(raw)
            lengths.append(len(chunk_raws))
            chunks.append(chunk_raws)
        return (
            "\0".join(paths),
            b"".join(keys),
            b"".join(digests),
            to_le(lengths),
            b"".join(chunks),
        )


def _last_pack(value: object) -> LastPack | None:
    """``last_pack`` as saved, or None for anything of another shape."""
    if not isinstance(value, tuple) or len(value) != 3:
        return None
    store, ref, raw = value
    if type(store) is not str or type(ref) is not str or type(raw) is not bytes:
        return None
    if len(raw) != DIGEST_SIZE:
        return None
    return store, ref, Digest.trusted(raw)
