"""Packing: walk a tree, hash it in threads, build the manifest, upload what the CAS lacks.

``pack()`` is the whole pipeline; the walk, the reads and the hashing are sync functions run
in worker threads (both cores), never on the trio loop. Hashing and uploading overlap: files
are hashed in jobs (many small files per job, one job per file above 16 MiB, read a few
chunks at a time), each file read ONCE; after each job ``find_missing`` is asked about the
digests not asked about before, and only the blobs the CAS lacks go on, with the bytes just
read, into upload batches (``CAS.put_many``: one durable commit per batch; the backend
compresses). So a publish of a mostly unchanged tree compresses and uploads only what
changed. Blobs known from the stat cache are asked about too; the ones the CAS lacks are read
back and checked against their digest. The manifest is uploaded after every ``put_many`` has
returned (its blobs durable), so a manifest in the CAS is always complete.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from pathlib import Path
from typing import Final, NamedTuple

import trio

from lazycaf.builds.pyc import hash_based, source_path, with_filename
from lazycaf.cas.api import CAS
from lazycaf.core.chunking import DEFAULT_CHUNK_SIZE, chunk_spans
from lazycaf.core.digest import DIGEST_SIZE, Digest, Hasher
from lazycaf.core.errors import LazyCafError, PackError
from lazycaf.core.manifest import (
    HARDLINK,
    Manifest,
    decode_columns,
    encode_columns,
)
from lazycaf.core.nogc import paused_gc
from lazycaf.disk.readahead import will_need
from lazycaf.trees.statcache import RawHashes, StatCache
from lazycaf.trees.walk import Scanned, Walked, walk_tree

__all__ = ["Normalize", "PackProgress", "PackResult", "pack"]

log = logging.getLogger(__name__)

_HASH_THREADS: Final = 2  # both cores; blake3 and the reads release the GIL
_HASH_WORKERS: Final = 4  # tasks: one waits on find_missing while another hashes
_HASH_BATCH_BYTES: Final = 16 << 20  # a job's bytes; a bigger file is streamed alone
_HASH_BATCH_FILES: Final = 512
_KNOWN_BATCH_BLOBS: Final = 4096  # stat-cache hits asked about per find_missing
_UPLOAD_BATCH_BYTES: Final = 16 << 20
_UPLOAD_BATCH_BLOBS: Final = 2048  # small blobs: one syncfs per 2048 (98 vs 125 us a blob at 256)
_COUNTING: Final = threading.Lock()
_MAX_BATCHES_IN_FLIGHT: Final = 4  # each holds up to ~16 MiB (plus its compressed copy)
_READ_AHEAD_FILES: Final = 32  # files of a hash job opened and advised ahead of the one read


@dataclass
class PackProgress:
    """Counters ``pack`` updates as it goes; a terminal display reads them."""

    phase: str = "scanning"
    files: int = 0
    files_hashed: int = 0
    bytes_total: int = 0
    bytes_hashed: int = 0
    blobs: int = 0
    blobs_missing: int = 0
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0
    pyc_rewritten: int = 0  # --normalize: timestamp .pyc made unchecked hash-based
    pyc_kept: int = 0  # --normalize: .pyc left as they are (stale, another Python, ...)

    @property
    def blobs_skipped(self) -> int:
        return self.blobs - self.blobs_missing


@dataclass(frozen=True)
class Normalize:
    """``pack --normalize``: every mtime in the manifest set to ``epoch`` (seconds), and each
    timestamp-based ``.pyc`` valid for its source rewritten unchecked hash-based
    (``lazycaf.builds.pyc``); nothing else changes."""

    epoch: int = 0


@dataclass(frozen=True)
class PackResult:
    """The packed manifest's digest and canonical bytes (``manifest``: decoded on first use;
    the pack itself makes no object per entry for it)."""

    digest: Digest
    encoded: bytes = field(repr=False)
    progress: PackProgress = field(compare=False)

    @cached_property
    def manifest(self) -> Manifest:
        return Manifest.decode(self.encoded)


Hashes = tuple[Digest, tuple[Digest, ...]]  # a file's digest and its chunks' (none: one blob)


class Blob(NamedTuple):
    """A blob of the tree: its digest, where its bytes are, and the bytes themselves while
    this pack holds them (None: read back from the tree, and checked, if the CAS lacks it)."""

    digest: Digest
    path: str
    offset: int
    length: int
    data: bytes | None = None


def _open(where: str, seen: Scanned | None = None) -> int:
    """``where``, opened to read. With ``seen`` (the file as the walk saw it): a regular file,
    not a symlink, and where the walk found its inode, the same inode; a file or a
    directory above it replaced after the walk (a symlink to elsewhere put in its place)
    is a ``PackError``, never bytes from outside the tree. ``O_NONBLOCK``: a FIFO put in a
    file's place fails the check instead of blocking the open."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    if seen is not None:
        flags |= os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(where, flags)
    except OSError as exc:
        if seen is not None and exc.errno == errno.ELOOP:
            raise PackError(f"{where} changed while packing (now a symlink)") from None
        raise PackError(f"cannot read {where}: {exc.strerror}") from exc
    if seen is None:
        return fd
    st = os.fstat(fd)
    same = seen.key is None or (st.st_ino, st.st_dev) == (seen.key[3], seen.key[4])
    if not (stat.S_ISREG(st.st_mode) and same):
        os.close(fd)
        raise PackError(f"{where} changed while packing (not the file the walk found)")
    return fd


def _read(fd: int, length: int, where: str, *, last: bool = False) -> bytes:
    """The next ``length`` bytes of ``fd``; ``last``: they must end the file (one read
    syscall for a whole small file: it asks for one byte more). Raw ``os`` calls, not
    ``open()``: a buffered file object costs ioctl, lseek and fstat calls per file."""
    want = length + 1 if last else length
    try:
        data = os.read(fd, want)
        while len(data) < length:  # a short read: rare on a regular file
            more = os.read(fd, want - len(data))
            if not more:
                break
            data += more
    except OSError as exc:
        raise PackError(f"cannot read {where}: {exc.strerror}") from exc
    if len(data) != length:
        raise PackError(f"{where} changed size while packing")
    return data


class ReadAhead:
    """The files of a hash job, opened ``_READ_AHEAD_FILES`` ahead of the one being read,
    each with its bytes asked for (``will_need``). A tree not in the page cache (written a
    while ago, or larger than memory) was read one file at a time per hashing thread, so
    the disk had two reads in flight and the cores waited on it; now it has the window's.
    ``take(k)`` hands over file ``k``'s descriptor (taken in order; the caller closes it);
    ``close`` closes those not taken."""

    def __init__(self, root: str, files: list[Scanned]) -> None:
        self._root, self._files = root, files
        self._fds: dict[int, int] = {}
        self._opened = 0  # files opened so far (in order)

    def take(self, k: int) -> int:
        while self._opened < len(self._files) and self._opened <= k + _READ_AHEAD_FILES:
            s = self._files[self._opened]
            fd = _open(f"{self._root}/{s.path}", s)
            self._fds[self._opened] = fd
            self._opened += 1
            will_need(fd)
        return self._fds.pop(k)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def hash_small(root: str, rel: str, size: int, fd: int | None = None) -> tuple[Hashes, Blob]:
    """Read and hash a file of at most one chunk: its digest and its one blob, bytes held.
    ``fd``: the file opened already (closed here)."""
    where = f"{root}/{rel}"
    fd = _open(where) if fd is None else fd
    try:
        data = _read(fd, size, where, last=True)
    finally:
        os.close(fd)
    digest = Digest.of(data)
    return (digest, ()), Blob(digest, rel, 0, size, data)


class ChunkedFile:
    """A file above the chunk size, read once in order: the whole-file digest and each
    chunk's digest and bytes, a few chunks per ``read`` (so a big file is never all in
    memory). Sync code for a worker thread; ``close`` always."""

    def __init__(
        self, root: str, rel: str, size: int, chunk_size: int, fd: int | None = None
    ) -> None:
        """``fd``: the file opened already (``close`` closes it)."""
        self.rel, self.where = rel, f"{root}/{rel}"
        self._spans = chunk_spans(size, chunk_size)
        self._next = 0
        self._whole = Hasher()
        self._chunks: list[Digest] = []
        self._fd = _open(self.where) if fd is None else fd

    @property
    def done(self) -> bool:
        return self._next == len(self._spans)

    def read(self, max_chunks: int | None = None) -> list[Blob]:
        """The next ``max_chunks`` chunks (all: None); the last one checks that the file
        ends there."""
        n = len(self._spans) if max_chunks is None else max(1, max_chunks)
        if n < len(self._spans) - self._next:  # the next call's chunks: read in meanwhile
            after = self._spans[self._next + n : self._next + 2 * n]
            will_need(self._fd, after[0][0], sum(length for _, length in after))
        out = []
        for off, length in self._spans[self._next : self._next + n]:
            self._next += 1
            data = _read(self._fd, length, self.where, last=self.done)
            self._whole.update(data)
            digest = Digest.of(data)
            self._chunks.append(digest)
            out.append(Blob(digest, self.rel, off, length, data))
        return out

    def hashes(self) -> Hashes:
        assert self.done
        return self._whole.digest(), tuple(self._chunks)

    def close(self) -> None:
        os.close(self._fd)


def hash_pyc(
    root: str,
    s: Scanned,
    source: Scanned,
    chunk_size: int,
    progress: PackProgress,
    fd: int | None = None,
) -> tuple[Hashes, Blob]:
    """``hash_small`` of a ``.pyc`` under ``--normalize``: when it is a timestamp-based
    ``.pyc`` valid for ``source``, rewritten unchecked hash-based with ``co_filename`` the
    source's path in the tree (else its bytes as they are). ``fd``: the ``.pyc`` opened
    already (closed here)."""
    (_, _), blob = hash_small(root, s.path, s.size, fd)
    assert blob.data is not None
    where = f"{root}/{source.path}"
    source_fd = _open(where, source)
    try:
        source_bytes = _read(source_fd, source.size, where, last=True)
    finally:
        os.close(source_fd)
    rewritten = hash_based(blob.data, source_bytes, source.mtime_ns)
    if rewritten is not None:  # and the build dir it records, which imports never see
        renamed = with_filename(rewritten, source.path)
        if renamed is not None and len(renamed) <= chunk_size:  # still one blob
            rewritten = renamed
    with _COUNTING:  # two hash threads count
        if rewritten is None:
            progress.pyc_kept += 1
        else:
            progress.pyc_rewritten += 1
    if rewritten is None:
        return (blob.digest, ()), blob
    digest = Digest.of(rewritten)
    return (digest, ()), Blob(digest, s.path, 0, len(rewritten), rewritten)


def hash_batch(
    root: str,
    batch: list[Scanned],
    chunk_size: int,
    pyc_sources: dict[str, Scanned] | None = None,
    progress: PackProgress | None = None,
) -> list[tuple[Hashes, list[Blob]]]:
    """Hash a batch of files (one thread hop for the batch): each file's digests and blobs,
    bytes held. ``pyc_sources`` (``--normalize``): ``.pyc`` paths and their sources."""
    out: list[tuple[Hashes, list[Blob]]] = []
    ahead = ReadAhead(root, batch)
    try:
        for k, s in enumerate(batch):
            fd = ahead.take(k)
            if pyc_sources and s.path in pyc_sources:
                assert progress is not None
                pyc = hash_pyc(root, s, pyc_sources[s.path], chunk_size, progress, fd)
                out.append((pyc[0], [pyc[1]]))
                continue
            if s.size <= chunk_size:
                hashes, blob = hash_small(root, s.path, s.size, fd)
                out.append((hashes, [blob]))
                continue
            f = ChunkedFile(root, s.path, s.size, chunk_size, fd)
            try:
                blobs = f.read()
            finally:
                f.close()
            out.append((f.hashes(), blobs))
    finally:
        ahead.close()
    return out


def read_blob(root: str, blob: Blob) -> bytes:
    """A blob's bytes read back from the tree (a stat-cache hit the CAS lacks), checked to
    hash as they did."""
    where = f"{root}/{blob.path}"
    fd = _open(where)
    try:
        os.lseek(fd, blob.offset, os.SEEK_SET)
        data = _read(fd, blob.length, where)
    finally:
        os.close(fd)
    if Digest.of(data) != blob.digest:
        raise PackError(
            f"{where} changed while packing (blob {blob.digest.short} no longer matches)"
        )
    return data


def blob_bytes(root: str, batch: list[Blob]) -> list[tuple[Digest, bytes]]:
    """(digest, bytes) for each blob of an upload batch, reading back those not held."""
    return [(b.digest, b.data if b.data is not None else read_blob(root, b)) for b in batch]


def known_blobs(s: Scanned, hashes: Hashes, chunk_size: int) -> list[Blob]:
    """The blobs of a file whose digests the stat cache knew (bytes not held)."""
    digest, chunks = hashes
    if not chunks:  # most files: one blob
        return [Blob(digest, s.path, 0, s.size)]
    spans = chunk_spans(s.size, chunk_size)
    return [Blob(d, s.path, off, n) for d, (off, n) in zip(chunks, spans, strict=True)]


def _blob_digests(hashes: Hashes) -> tuple[Digest, ...]:
    """A file's blobs' digests: its chunks', or its own when it is one blob."""
    digest, chunks = hashes
    return chunks or (digest,)


def _digests(raw: RawHashes) -> Hashes:
    """Raw hashes (a stat-cache hit) as ``Digest`` objects."""
    digest, chunks = raw
    return Digest.trusted(digest), tuple(Digest.trusted_column(chunks)) if chunks else ()


def _raw(hashes: Hashes) -> RawHashes:
    digest, chunks = hashes
    return digest.raw, b"".join(c.raw for c in chunks)


def _jobs(files: list[Scanned], chunk_size: int) -> Iterator[list[Scanned]]:
    """Hash jobs: each file above ``_HASH_BATCH_BYTES`` alone (it is streamed), the biggest
    first, so no big file is left to hash on one core at the end; the small files in
    batches of up to ``_HASH_BATCH_FILES`` files or ``_HASH_BATCH_BYTES``, in path order.
    The two kinds are interleaved by their estimated time, so that the small files' work
    (mostly Python, holding the GIL) runs beside the big files' (blake3 and reads, which
    release it) from start to end, not all at once."""
    big = sorted((s for s in files if s.size > _HASH_BATCH_BYTES), key=_SIZE, reverse=True)
    small = list(_small_batches(files))
    big_cost = [_cost(1, s.size) for s in big]
    small_cost = [_cost(len(job), sum(s.size for s in job)) for job in small]
    total_big, total_small = sum(big_cost) or 1.0, sum(small_cost) or 1.0
    i = j = 0
    done_big = done_small = 0.0
    while i < len(big) or j < len(small):
        if j == len(small) or (i < len(big) and done_big / total_big <= done_small / total_small):
            yield [big[i]]
            done_big += big_cost[i]
            i += 1
        else:
            yield small[j]
            done_small += small_cost[j]
            j += 1


def _small_batches(files: list[Scanned]) -> Iterator[list[Scanned]]:
    batch: list[Scanned] = []
    size = 0
    for s in files:
        if s.size > _HASH_BATCH_BYTES:
            continue
        batch.append(s)
        size += s.size
        if size >= _HASH_BATCH_BYTES or len(batch) >= _HASH_BATCH_FILES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _cost(files: int, size: int) -> float:
    """A hash job's time on one core, roughly: ~30 us a file (open, read, close, the
    Python around them), ~1 ns a byte (a read and two blake3 passes)."""
    return files * 30e-6 + size * 1e-9


_SIZE: Final = attrgetter("size")


def encode_manifest(
    walked: Walked,
    statcache: StatCache | None,
    hashed: dict[str, RawHashes],
    chunk_size: int,
    *,
    keep_setid: bool = False,
    mtime_ns: int | None = None,
    sizes: dict[str, int] | None = None,
) -> bytes:
    """The manifest of a walked tree as its canonical bytes, built a column at a time (no
    object per entry); a file's digests from the stat cache's record (``walked.found``) or
    from ``hashed``; ``mtime_ns``: every entry's mtime, ``sizes``: files whose bytes were
    rewritten, and their new sizes (``--normalize``). Unchecked: ``_build_and_encode``
    validates the bytes."""
    paths, kinds, found = walked.paths, walked.kinds, walked.found
    mtimes, lengths = walked.mtimes, walked.sizes
    if mtime_ns is not None:
        mtimes = array("q", [0 if k == HARDLINK else mtime_ns for k in kinds])
    if sizes:
        lengths = array("Q", lengths)
        where = {p: i for i, p in enumerate(paths)}
        for path, size in sizes.items():
            lengths[where[path]] = size
    files = walked.files()
    column = b"" if statcache is None else statcache.digest_column
    n = DIGEST_SIZE
    digests = b"".join(
        [column[n * j : n * j + n] if (j := found[i]) >= 0 else hashed[paths[i]][0] for i in files]
    )
    chunked = [i for i in files if lengths[i] > chunk_size]

    def recorded_chunks(j: int) -> bytes:
        assert statcache is not None  # a record found only where a stat cache vouched
        return statcache.raw(j)[1]

    chunks = b"".join(
        [recorded_chunks(j) if (j := found[i]) >= 0 else hashed[paths[i]][1] for i in chunked]
    )
    mask = 0o7777 if keep_setid else 0o1777
    root_st = walked.root_st
    return encode_columns(
        chunk_size,
        stat.S_IMODE(root_st.st_mode) & mask,
        root_st.st_mtime_ns if mtime_ns is None else mtime_ns,
        "".join(kinds),
        walked.modes,
        mtimes,
        lengths,
        paths,
        walked.targets,
        digests,
        chunks,
    )


class _Known:
    """The files the stat cache vouched for: their records in ``statcache``."""

    def __init__(self, walked: Walked, statcache: StatCache | None) -> None:
        self._walked, self._statcache = walked, statcache

    def blobs(self) -> set[bytes]:
        """Every blob of theirs, as raw digests (a worker thread: ~0.1 s at 300k files)."""
        if self._statcache is None:
            return set()
        return self._statcache.blobs([j for j in self._walked.found if j >= 0])

    def files(self) -> list[tuple[Scanned, RawHashes]]:
        """Each file and its digests, in path order."""
        walked, cache = self._walked, self._statcache
        if cache is None:
            return []
        found = walked.found
        return [(walked.scanned(i), cache.raw(found[i])) for i in walked.files() if found[i] >= 0]


class _Uploads:
    """The blobs found so far and the upload queue: each digest is asked about once, the ones
    the CAS lacks go out in batches of up to ``_UPLOAD_BATCH_BLOBS`` blobs or
    ``_UPLOAD_BATCH_BYTES`` (``send`` waits while every upload worker is busy, which bounds
    the bytes held)."""

    def __init__(
        self,
        cas: CAS,
        send: trio.MemorySendChannel[list[Blob]],
        progress: PackProgress,
        stored: set[bytes],
    ) -> None:
        """``stored``: raw digests known to be in the CAS (``_last_pack_still_named``),
        never asked about."""
        self._cas, self._send, self._progress = cas, send, progress
        self._asked = stored  # raw digests: no Python __hash__ call a blob
        progress.blobs += len(stored)
        self._queue: list[Blob] = []
        self._queued_bytes = 0

    async def offer(self, blobs: list[Blob]) -> None:
        """Ask the CAS about the blobs not asked about yet; queue the ones it lacks."""
        missing = await self._ask(b.digest for b in blobs)
        if missing:
            await self._queue_missing(blobs, missing)

    async def offer_known(self, files: list[tuple[Scanned, RawHashes]], chunk_size: int) -> None:
        """``offer`` for files whose digests the stat cache knew: the digests are asked
        about first and a ``Blob`` is made only for the files holding one the CAS lacks (a
        re-pack asks about every blob of the tree and uploads a handful)."""
        hashes = [_digests(raw) for _, raw in files]
        missing = await self._ask(d for h in hashes for d in _blob_digests(h))
        if missing:
            blobs = [
                b
                for (s, _), h in zip(files, hashes, strict=True)
                for b in known_blobs(s, h, chunk_size)
            ]
            await self._queue_missing(blobs, missing)

    async def _ask(self, digests: Iterable[Digest]) -> set[Digest]:
        """Of the digests not asked about before (each once), those the CAS lacks."""
        new = []
        asked = self._asked
        for d in digests:
            raw = d.raw
            if raw not in asked:
                asked.add(raw)
                new.append(d)
        if not new:
            return set()
        self._progress.blobs += len(new)
        return set(await self._cas.find_missing(new))

    async def _queue_missing(self, blobs: list[Blob], missing: set[Digest]) -> None:
        """Queue each blob whose digest is in ``missing`` (emptied as it goes: a blob two
        files hold is queued once)."""
        for b in blobs:
            if b.digest in missing:
                missing.discard(b.digest)
                self._queue.append(b)
                self._queued_bytes += b.length
                self._progress.blobs_missing += 1
        while len(self._queue) >= _UPLOAD_BATCH_BLOBS or self._queued_bytes >= _UPLOAD_BATCH_BYTES:
            await self._send_batch()

    async def flush(self) -> None:
        while self._queue:
            await self._send_batch()

    async def _send_batch(self) -> None:
        batch: list[Blob] = []
        size = 0
        for b in self._queue:  # at least one blob; a bigger one goes alone
            if batch and (
                size + b.length > _UPLOAD_BATCH_BYTES or len(batch) >= _UPLOAD_BATCH_BLOBS
            ):
                break
            batch.append(b)
            size += b.length
        del self._queue[: len(batch)]  # taken before the await: other tasks queue meanwhile
        self._queued_bytes -= size
        await self._send.send(batch)


async def pack(
    root: Path,
    cas: CAS,
    *,
    tag: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_setid: bool = False,
    concurrency: int = 8,
    progress: PackProgress | None = None,
    stat_cache_dir: Path | None = None,
    normalize: Normalize | None = None,
) -> PackResult:
    """Pack ``root`` into ``cas``; returns the manifest digest that names the executable.

    ``concurrency`` bounds the upload batches in flight (at most 4); an HTTP CAS keeps up to
    8 PUTs of them in flight (``HttpCAS``'s ``put_concurrency``)."""
    progress = progress if progress is not None else PackProgress()
    plan = await trio.to_thread.run_sync(
        functools.partial(
            _plan,
            root,
            chunk_size,
            stat_cache_dir,
            progress,
            keep_setid=keep_setid,
            normalize=normalize is not None,
        )
    )
    hashes: dict[str, Hashes] = {}  # the files hashed by this pack
    resized: dict[str, int] = {}  # --normalize: .pyc files whose size changed
    upload = functools.partial(
        _hash_and_upload,
        root,
        cas,
        hashes=hashes,
        chunk_size=chunk_size,
        concurrency=concurrency,
        progress=progress,
        pyc_sources=plan.pyc_sources,
        resized=resized,
    )
    known_stored = await _last_pack_still_named(cas, plan.statcache)
    known = _Known(plan.walked, plan.statcache)
    await upload(plan.todo, known, known_stored=known_stored)
    epoch_ns = None if normalize is None else normalize.epoch * 1_000_000_000
    encoded = await trio.to_thread.run_sync(
        functools.partial(
            _build_and_encode,
            plan.walked,
            plan.statcache,
            hashes,
            chunk_size,
            keep_setid,
            epoch_ns,
            resized,
        )
    )
    digest = Digest.of(encoded)
    if known_stored and not await _last_pack_still_named(cas, plan.statcache):
        # the ref moved while this pack ran: its root no longer vouches for the known
        # blobs, so ask about them now (a directory store refreshes them for its GC)
        counted = progress.blobs
        await upload([], known, known_stored=False)
        progress.blobs = counted
    await cas.put(digest, encoded)  # after every blob it names is durable
    if tag:
        await cas.set_ref(tag, digest)
    if plan.statcache is not None:
        if tag:
            plan.statcache.remember_pack(cas.where, tag, digest)
        recorded = [s for s in plan.todo if s.path not in plan.pyc_sources]
        try:
            await trio.to_thread.run_sync(_save_stat_cache, plan.statcache, recorded, hashes)
        except OSError as exc:  # the pack stands: the next one hashes every file again
            log.warning(
                "could not save the stat cache %s (%s): the next pack of %s hashes every file",
                plan.statcache.path,
                exc.strerror or exc,
                root,
            )
    progress.phase = "done"
    return PackResult(digest, encoded, progress)


async def _last_pack_still_named(cas: CAS, statcache: StatCache | None) -> bool:
    """Whether the digests the stat cache knows are blobs ``cas`` holds under a live root:
    the pack that wrote the cache set a ref in this store, and the ref still names its
    manifest, which lists every one of them. Then a re-pack need not ask about them (nor,
    on a directory store, refresh each one's mtime: a root keeps them from the store GC,
    and the new manifest lists the same blobs before its ref moves). The store is trusted
    to hold what its manifests list, as a mount trusts it."""
    last = None if statcache is None else statcache.last_pack
    if last is None:
        return False
    store, ref, manifest = last
    if store != cas.where:
        return False
    try:
        return await cas.get_ref(ref) == manifest
    except LazyCafError:  # no such ref any more, or the store cannot say: ask as usual
        return False


class _Plan(NamedTuple):
    """What the walk found and the stat cache knew: the files to hash (``todo``); the
    others' records are in ``walked.found``."""

    walked: Walked
    todo: list[Scanned]
    statcache: StatCache | None
    pyc_sources: dict[str, Scanned]  # --normalize: .pyc files to rewrite, and their sources


def _plan(
    root: Path,
    chunk_size: int,
    stat_cache_dir: Path | None,
    progress: PackProgress,
    *,
    keep_setid: bool,
    normalize: bool = False,
) -> _Plan:
    """Walk the tree and look every file up in the stat cache (a worker thread). With
    ``normalize``, the ``.pyc`` files to rewrite are hashed every time: their bytes depend on
    their source's, which the stat cache does not key them by."""
    with paused_gc(freeze=True):  # ~1M objects kept for the whole pack, no cycles
        statcache = None
        if stat_cache_dir is not None:
            variant = "normalize" if normalize else ""
            statcache = StatCache.for_tree(stat_cache_dir, root, chunk_size, variant=variant)
        walked = walk_tree(root, keep_setid=keep_setid, statcache=statcache)
        files, sizes, found = walked.files(), walked.sizes, walked.found
        progress.files = len(files) + walked.hard_links  # a hard link is a file, not hashed
        progress.bytes_total = sum([sizes[i] for i in files]) + walked.hard_link_bytes
        progress.phase = "hashing"
        pyc_sources: dict[str, Scanned] = {}
        if normalize:  # a .pyc to rewrite is hashed again, whatever the stat cache knew
            scanned = [walked.scanned(i) for i in files]
            pyc_sources = _pyc_sources(scanned, chunk_size)
            for i, s in zip(files, scanned, strict=True):
                if s.path in pyc_sources and found[i] >= 0:
                    assert statcache is not None
                    statcache.forget(found[i])
                    found[i] = -1
            todo = [s for i, s in zip(files, scanned, strict=True) if found[i] < 0]
        else:
            todo = [walked.scanned(i) for i in walked.unvouched]
        progress.files_hashed = len(files) - len(todo)
        progress.bytes_hashed = sum([sizes[i] for i in files]) - sum(s.size for s in todo)
    return _Plan(walked, todo, statcache, pyc_sources)


def _pyc_sources(files: list[Scanned], chunk_size: int) -> dict[str, Scanned]:
    """``__pycache__`` files of at most one chunk whose source is a regular file here."""
    by_path = {s.path: s for s in files}
    out = {}
    for s in files:
        if s.path.endswith(".pyc") and s.size <= chunk_size:
            src = source_path(s.path)
            if src is not None and src in by_path:
                out[s.path] = by_path[src]
    return out


def _build_and_encode(
    walked: Walked,
    statcache: StatCache | None,
    hashed: dict[str, Hashes],
    chunk_size: int,
    keep_setid: bool,
    mtime_ns: int | None,
    sizes: dict[str, int],
) -> bytes:
    """The manifest's bytes, validated as any manifest from a store is (the checks a
    ``Manifest`` makes of its entries, a column at a time)."""
    with paused_gc():
        encoded = encode_manifest(
            walked,
            statcache,
            {path: _raw(h) for path, h in hashed.items()},
            chunk_size,
            keep_setid=keep_setid,
            mtime_ns=mtime_ns,
            sizes=sizes,
        )
        decode_columns(encoded, name="packed manifest")
        return encoded


def _save_stat_cache(
    statcache: StatCache, hashed: list[Scanned], hashes: dict[str, Hashes]
) -> None:
    with paused_gc():
        for s in hashed:  # a hit is carried over by its lookup
            assert s.key is not None
            statcache.record(s.path, s.key, *hashes[s.path])
        statcache.save()


async def _hash_and_upload(
    root: Path,
    cas: CAS,
    todo: list[Scanned],
    known: _Known,
    hashes: dict[str, Hashes],
    chunk_size: int,
    concurrency: int,
    progress: PackProgress,
    pyc_sources: dict[str, Scanned],
    resized: dict[str, int],
    *,
    known_stored: bool = False,
) -> None:
    """Hash ``todo`` (into ``hashes``) and upload every blob of ``todo`` and ``known`` that
    the CAS lacks (``known_stored``: ``known``'s blobs are in the CAS, not asked about), all
    at once: hash jobs on two worker threads; after each job, one
    ``find_missing`` for its new digests, BEFORE anything is compressed; the blobs missing
    go to upload batches with the bytes just read (read once, hashed once by the pack);
    ``concurrency`` upload batches (at most 4, at most the CAS's ``upload_batches`` where it
    says) in flight. Returns once every batch's
    ``put_many`` has returned: the blobs are durable before the manifest goes."""
    where = str(root)
    send_up, receive_up = trio.open_memory_channel[list[Blob]](0)
    stored = await trio.to_thread.run_sync(known.blobs) if known_stored else set()
    uploads = _Uploads(cas, send_up, progress, stored)
    hash_limiter = trio.CapacityLimiter(_HASH_THREADS)

    async def upload_worker(receive: trio.MemoryReceiveChannel[list[Blob]]) -> None:
        async with receive:
            async for batch in receive:
                if all(b.data is not None for b in batch):
                    items = [(b.digest, b.data) for b in batch if b.data is not None]
                else:
                    items = await trio.to_thread.run_sync(blob_bytes, where, batch)
                await cas.put_many(items)
                progress.blobs_uploaded += len(batch)
                progress.bytes_uploaded += sum(b.length for b in batch)

    async def hash_worker(receive: trio.MemoryReceiveChannel[list[Scanned]]) -> None:
        async with receive:
            async for job in receive:
                if len(job) == 1 and job[0].size > _HASH_BATCH_BYTES:
                    await stream_file(job[0])
                    continue
                done = await trio.to_thread.run_sync(
                    hash_batch, where, job, chunk_size, pyc_sources, progress, limiter=hash_limiter
                )
                blobs: list[Blob] = []
                for s, (h, file_blobs) in zip(job, done, strict=True):
                    hashes[s.path] = h
                    if file_blobs[0].length != s.size and not h[1]:  # a rewritten .pyc
                        resized[s.path] = file_blobs[0].length
                    blobs += file_blobs
                progress.files_hashed += len(job)
                progress.bytes_hashed += sum(s.size for s in job)
                await uploads.offer(blobs)

    async def stream_file(s: Scanned) -> None:
        f = await trio.to_thread.run_sync(ChunkedFile, where, s.path, s.size, chunk_size)
        try:
            per_read = max(1, _HASH_BATCH_BYTES // chunk_size)
            while not f.done:
                blobs = await trio.to_thread.run_sync(f.read, per_read, limiter=hash_limiter)
                progress.bytes_hashed += sum(b.length for b in blobs)
                await uploads.offer(blobs)
        finally:
            f.close()
        hashes[s.path] = f.hashes()
        progress.files_hashed += 1

    async def offer_known() -> None:
        if known_stored:  # in ``uploads`` as asked about already
            return
        files: list[tuple[Scanned, RawHashes]] = []
        count = 0
        for file in await trio.to_thread.run_sync(known.files):
            files.append(file)
            count += max(1, len(file[1][1]) // DIGEST_SIZE)
            if count >= _KNOWN_BATCH_BLOBS:
                await uploads.offer_known(files, chunk_size)
                files, count = [], 0
        await uploads.offer_known(files, chunk_size)

    async with trio.open_nursery() as nursery:
        async with receive_up:
            batches = getattr(cas, "upload_batches", _MAX_BATCHES_IN_FLIGHT)
            for _ in range(max(1, min(concurrency, batches, _MAX_BATCHES_IN_FLIGHT))):
                nursery.start_soon(upload_worker, receive_up.clone())
        async with send_up:
            send_jobs, receive_jobs = trio.open_memory_channel[list[Scanned]](0)
            async with trio.open_nursery() as hashing:
                hashing.start_soon(offer_known)
                async with receive_jobs:
                    for _ in range(_HASH_WORKERS):
                        hashing.start_soon(hash_worker, receive_jobs.clone())
                async with send_jobs:
                    for job in _jobs(todo, chunk_size):
                        await send_jobs.send(job)
            progress.phase = "uploading"
            await uploads.flush()
