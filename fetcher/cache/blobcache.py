"""Blob files on disk under the host cache: atomic commit and start-up reconciliation.

Layout::

    <cache>/index.lmdb/          the LMDB index (``lazycaf.host.index``)
    <cache>/blobs/<2 hex>/<hex>  verified blob content, uncompressed (Btrfs compresses it)
    <cache>/tmp/                 downloads in flight

Invariant: a file appears under ``blobs/`` only after its content verified against its name:
write to ``tmp/`` (``stage``), rename, then commit the index (``publish``). A full disk
while staging raises ``CacheFull`` and leaves no temp file. One fsync per blob costs more than the
fetch itself on a cold start (hundreds of small blobs), so durability is batched instead:
the index marks a new blob unsynced, ``flush()`` (the daemon calls it every second) makes
every pending file durable with one ``syncfs`` and then marks them synced. After a crash,
``reconcile()`` removes temp files and re-verifies every blob that is unsynced or missing from
the index, so no blob that reads wrong survives a restart; mounts start the daemon (and so the
reconciliation) before they read. Sync code: the daemon calls it through worker threads.

Encoded writes (``encoded_writes=True``): a blob the CAS sent as zstd frames is written with
``BTRFS_IOC_ENCODED_WRITE`` (``lazycaf.disk.btrfs_encoded``), each frame becoming a compressed
extent as it is, instead of plain bytes that Btrfs compresses again at writeback. The blob is
still decoded and verified first (the kernel does not check what it stores). Frames Btrfs
would not keep compressed, and every frame on a filesystem that refuses the ioctl (not Btrfs,
no CAP_SYS_ADMIN, an old kernel), are written plain; after the first refusal the cache stops
trying. ``scripts/bench_cache.py`` measures both ways. Off by default: an encoded write leaves
nothing in the page cache, so the read that follows an on-demand fetch becomes a cold read.
``$LAZYCAF_ENCODED_WRITES=1`` turns it on for a cache opened without an explicit choice (the
daemon's).

Compression deferred (on by default on Btrfs; ``defer_compression=False`` or
``$LAZYCAF_DEFER_COMPRESSION=0`` turns it off): ``tmp/`` is set to write without compression
(``lazycaf.disk.btrfs_compress``), so a blob fetched on a cold start costs the kernel no zstd
at writeback while the job waits; the index marks it ``plain``, and ``compress`` rewrites it
compressed later (the daemon's ``fetcher.cache.compactor``, once fetching has gone quiet).
``take_plain`` hands over the blobs published plain since the last call, and after
``reconcile`` every plain blob the index holds (a daemon stopped before compressing them).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import subprocess
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lazycaf.core import framing
from lazycaf.core.digest import Digest, Hasher
from lazycaf.core.errors import CacheFull
from lazycaf.core.verified import Verified, verify_blob
from lazycaf.disk.btrfs_compress import can_compress, compress_file, compresses, set_compression
from lazycaf.disk.btrfs_encoded import frames_of, write_frames
from lazycaf.disk.readahead import will_need
from lazycaf.disk.syncfs import syncfs
from lazycaf.host.index import BlobRecord, Index
from lazycaf.host.paths import CacheLayout

__all__ = [
    "DEFER_COMPRESSION_ENV",
    "ENCODED_WRITES_ENV",
    "BlobCache",
    "Reconciled",
    "Staged",
    "WriteStatistics",
    "filesystem_type",
    "init_cache_dir",
]


log = logging.getLogger(__name__)

ENCODED_WRITES_ENV = "LAZYCAF_ENCODED_WRITES"
DEFER_COMPRESSION_ENV = "LAZYCAF_DEFER_COMPRESSION"
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_BUILD_AGE_S = 3600.0  # a manifest index build's temp file older than this was abandoned


@dataclass(frozen=True)
class Reconciled:
    temp_removed: int
    verified: int
    dropped: int
    blobs: int
    indexes_removed: int = 0


@dataclass(frozen=True)
class Staged:
    """A verified blob written to ``tmp/``, not yet published under ``blobs/``."""

    digest: Digest
    tmp: Path
    size: int


@dataclass(frozen=True)
class WriteStatistics:
    """How staged blobs were written: extents written encoded and their bytes of data, bytes
    written plain, and whether the filesystem still takes encoded writes (False after the
    first refusal)."""

    encoded_extents: int
    encoded_bytes: int
    plain_bytes: int
    encoded_supported: bool


class BlobCache:
    """The daemon's view of the cache: the only writer of blob files and of the index.

    Invariants: ``usage`` is the sum of the sizes of the blobs in the index; a blob is
    published (renamed into ``blobs/`` and indexed) and evicted (unlinked and unindexed)
    under one lock, so GC never races a new copy of the blob it deletes.
    """

    def __init__(
        self,
        root: Path,
        *,
        encoded_writes: bool | None = None,
        defer_compression: bool | None = None,
    ) -> None:
        self.root = root
        self.layout = layout = CacheLayout(root)
        for sub in (layout.blobs, layout.tmp):
            sub.mkdir(parents=True, exist_ok=True)
        self.index = Index(layout.index)
        self._pending: list[Digest] = []
        self._lock = threading.Lock()
        try:
            self._set_up(layout, encoded_writes)
            self._set_up_compression(layout, defer_compression)
        except BaseException:  # an Index left open would keep this process from reopening it
            self.index.close()
            raise

    def _set_up(self, layout: CacheLayout, encoded_writes: bool | None) -> None:
        self.usage = self.index.total_bytes()
        if encoded_writes is None:
            encoded_writes = os.environ.get(ENCODED_WRITES_ENV) == "1"
        self._encoded = encoded_writes
        self._encoded_ok = True  # until the filesystem refuses an encoded write
        self._sector = os.statvfs(layout.tmp).f_bsize
        self._written = [0, 0, 0]  # encoded extents, encoded bytes, plain bytes
        self._written_lock = threading.Lock()  # not _lock: staging never waits for GC
        self._tmp_prefix = f"{layout.tmp}/"
        self._blobs_prefix = f"{layout.blobs}/"
        self._pid = os.getpid()
        self._seq = itertools.count()  # next() is atomic under the GIL: threads share it
        self._shards: set[str] = set()  # blobs/<2 hex> directories known to exist

    def _set_up_compression(self, layout: CacheLayout, defer: bool | None) -> None:
        if defer is None:
            defer = os.environ.get(DEFER_COMPRESSION_ENV) != "0"
        # only where the filesystem compresses what is written into the cache in the first
        # place, not with encoded writes (their extents are compressed already), and only
        # where this process can compress a read-only file later (root: CAP_SYS_ADMIN)
        compressed = compresses(layout.blobs)
        self._plain = False
        if defer and not self._encoded and compressed:
            with contextlib.suppress(OSError):
                set_compression(layout.tmp, "none")
                self._plain = can_compress(layout.tmp)
        if compressed and not self._plain:  # tmp/ may have been set so by an earlier daemon
            with contextlib.suppress(OSError):
                set_compression(layout.tmp, "zstd")
        self._plain_landed: list[tuple[Digest, int]] = []  # published plain, not handed over
        self._plain_lock = threading.Lock()  # not _lock: the event loop takes it, GC holds that
        self._compressed = [0, 0]  # blobs, bytes rewritten compressed

    @property
    def writes_plain(self) -> bool:
        """Whether blobs are written plain now, to be compressed later."""
        return self._plain

    def take_plain(self) -> list[tuple[Digest, int]]:
        """The blobs (digest, size) published plain since the last call."""
        with self._plain_lock:
            out, self._plain_landed = self._plain_landed, []
        return out

    def compress(self, blobs: Sequence[tuple[Digest, int]]) -> int:
        """Rewrite these plain blobs' files compressed and mark them so in the index; the
        bytes done. A file gone meanwhile (evicted) is skipped; one the filesystem refuses
        to compress for good is marked too (it stays as it is); one it could not compress
        now (no space, interrupted, an I/O error) stays plain in the index, for the next
        daemon's start. Index errors (``CacheFull``, ``Unavailable``) are raised."""
        done, ok, nbytes = [], 0, 0
        for digest, size in blobs:
            try:
                compress_file(Path(self._blob_path(digest)))
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("blob %s not compressed: %s", digest, exc)
                if exc.errno in _TRANSIENT:
                    continue
            else:
                ok += 1
                nbytes += size
            done.append(digest)
        self.index.mark_compressed(done)
        with self._written_lock:
            self._compressed[0] += ok
            self._compressed[1] += nbytes
        return nbytes

    def compression_statistics(self) -> tuple[int, int]:
        """Blobs and bytes rewritten compressed since this cache was opened."""
        with self._written_lock:
            return self._compressed[0], self._compressed[1]

    def write_statistics(self) -> WriteStatistics:
        with self._written_lock:
            extents, encoded, plain = self._written
            return WriteStatistics(extents, encoded, plain, self._encoded_ok)

    def close(self) -> None:
        self.index.close()

    def path(self, digest: Digest) -> Path:
        return self.layout.blob(digest)

    def warm(self, digests: list[Digest]) -> list[Digest]:
        """Ask the kernel to read these blob files into the page cache, in this order
        (``POSIX_FADV_WILLNEED``: reads are queued, not waited for); returns those whose
        files are gone. Blocking: call it in a thread."""
        gone: list[Digest] = []
        for digest in digests:
            try:
                fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                gone.append(digest)
                continue
            except OSError:
                continue
            try:
                will_need(fd)
            finally:
                os.close(fd)
        return gone

    def has(self, digest: Digest) -> bool:
        return digest in self.index and self.path(digest).exists()

    def commit(self, digest: Digest, encoding: str, payload: bytes) -> int:
        """Decode, verify and store a blob; returns its size. Raises IntegrityError."""
        staged = self.stage(verify_blob(digest, encoding, payload))
        self.publish(staged, limit=None)
        return staged.size

    def stage(self, blob: Verified, *, encoded: bool | None = None) -> Staged:
        """Write a verified blob to ``tmp/`` (``<hex16>.<pid>.<n>``, created read-only and
        exclusive: no name generation, no chmod). A full disk raises ``CacheFull``; on any
        failure the temp file is gone. ``encoded`` overrides the cache's ``encoded_writes``
        for this blob (still only where the filesystem takes them)."""
        digest, encoding, payload, data = blob.digest, blob.encoding, blob.payload, blob.data
        tmp = ""
        try:
            fd, tmp = self._create_temp(digest)
            try:
                self._write(fd, encoding, payload, data, encoded)
            finally:
                os.close(fd)
        except BaseException as exc:
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"cache disk full while storing blob {digest}") from exc
            raise
        return Staged(digest, Path(tmp), len(data))

    def _create_temp(self, digest: Digest) -> tuple[int, str]:
        while True:
            tmp = f"{self._tmp_prefix}{digest.hex[:16]}.{self._pid}.{next(self._seq)}"
            try:
                return os.open(tmp, _TEMP_FLAGS, 0o444), tmp
            except FileExistsError:  # left by an earlier daemon with this pid: next name
                continue

    def _write(
        self, fd: int, encoding: str, payload: bytes, data: bytes, encoded: bool | None
    ) -> None:
        """Write a verified blob into the empty file ``fd``: its frames as compressed extents
        where they fit (encoded writes on), else its bytes."""
        wanted = self._encoded if encoded is None else encoded
        if wanted and self._encoded_ok and encoding == framing.ZSTD:
            res = write_frames(fd, payload, frames_of(payload), data, sector=self._sector)
            with self._written_lock:
                self._written[0] += res.encoded
                self._written[1] += res.encoded_bytes
                self._written[2] += res.plain_bytes
                if res.refused_errno is not None and self._encoded_ok:
                    self._encoded_ok = False
                    log.info(
                        "cache %s refuses encoded writes (%s): writing blobs plain",
                        self.root,
                        os.strerror(res.refused_errno),
                    )
            return
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.write(fd, view[done:])
        with self._written_lock:
            self._written[2] += len(view)

    def publish(self, staged: Staged, *, limit: int | None) -> bool:
        """Rename a staged blob into ``blobs/`` and index it, unless that would take
        ``usage`` above ``limit`` (then return False and keep it staged)."""
        (done,) = self.publish_many([staged], limit=limit)
        if isinstance(done, BaseException):
            raise done
        return done

    def publish_many(
        self, staged: Sequence[Staged], *, limit: int | None
    ) -> list[bool | CacheFull | OSError]:
        """``publish`` for several blobs under one lock and one index transaction (the
        per-blob transaction and lock were most of a small blob's cost). Per blob: True
        published, False kept staged (over ``limit``), or the error that discarded it."""
        out: list[bool | CacheFull | OSError] = []
        moved: list[tuple[Staged, BlobRecord]] = []
        now = time.time_ns()
        with self._lock:
            usage = self.usage
            try:
                for s in staged:
                    rec = self.index.get(s.digest)
                    added = 0 if rec is not None else s.size
                    if limit is not None and added and usage + added > limit:
                        out.append(False)
                        continue
                    try:
                        self._rename_in(s)
                    except OSError as exc:
                        self.discard(s)
                        out.append(_disk_error(exc, s.digest))
                        continue
                    pins = 0 if rec is None else rec.pins
                    moved.append((s, BlobRecord(s.size, now, pins, False, self._plain)))
                    usage += added
                    out.append(True)
            finally:
                if moved:
                    try:
                        self.index.put_many((s.digest, rec) for s, rec in moved)
                    except BaseException:
                        for s, _ in moved:  # no file under blobs/ without its record
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(self._blob_path(s.digest))
                        raise
                    self.usage = usage
                    self._pending.extend(s.digest for s, _ in moved)
                    if self._plain:
                        with self._plain_lock:
                            self._plain_landed.extend((s.digest, s.size) for s, _ in moved)
        return out

    def _blob_path(self, digest: Digest) -> str:
        hexd = digest.hex
        return f"{self._blobs_prefix}{hexd[:2]}/{hexd}"

    def _rename_in(self, staged: Staged) -> None:
        shard = staged.digest.hex[:2]
        if shard not in self._shards:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self._blobs_prefix + shard)
            self._shards.add(shard)
        try:
            os.replace(staged.tmp, self._blob_path(staged.digest))
        except FileNotFoundError:
            if not staged.tmp.exists():
                raise
            with contextlib.suppress(FileExistsError):  # the shard was removed behind us
                os.mkdir(self._blobs_prefix + shard)
            os.replace(staged.tmp, self._blob_path(staged.digest))

    def discard(self, staged: Staged) -> None:
        with contextlib.suppress(FileNotFoundError):
            staged.tmp.unlink()

    def evict(self, digests: list[Digest]) -> int:
        """Delete blobs (files, then their records in one transaction); returns the bytes
        freed. A process that has one open keeps reading it: Linux frees it on the last
        close. On a full disk the index may need the space the unlinks free, which Btrfs
        hands back only after a commit: sync once and try again."""
        with self._lock:
            gone: list[tuple[Digest, int]] = []
            for d in digests:
                rec = self.index.get(d)
                if rec is None:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    self.path(d).unlink()
                gone.append((d, rec.size))
            try:
                self.index.delete_many(d for d, _ in gone)
            except CacheFull:
                syncfs(self.root)
                self.index.delete_many(d for d, _ in gone)
            freed = sum(n for _, n in gone)
            self.usage -= freed
        self._forget_indexes([d for d, _ in gone])
        return freed

    def _forget_indexes(self, evicted: list[Digest]) -> None:
        """Remove the manifest indexes (``<cache>/manifests/<hex>.idx``) of the evicted
        blobs that were manifests: an index lives as long as its manifest is cached, and a
        later mount fetches the manifest and builds it again. A mount that has one mapped
        keeps reading it. One listing of the directory, not a failed unlink per blob."""
        folder = self.layout.manifests
        try:
            names = set(os.listdir(folder))
        except FileNotFoundError:
            return
        for d in evicted:
            if (path := self.layout.manifest_index(d)).name in names:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def drop(self, digest: Digest, *, unless_replaced: os.stat_result | None = None) -> bool:
        """Delete one blob found bad (its file, then its record); returns False when it is
        no longer indexed (evicted meanwhile), or its file is no longer the one
        ``unless_replaced`` describes (evicted and fetched again: a verified copy)."""
        path = self.path(digest)
        with self._lock:
            rec = self.index.get(digest)
            if rec is None:
                return False
            if unless_replaced is not None:
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    pass
                else:
                    if (now.st_dev, now.st_ino) != (unless_replaced.st_dev, unless_replaced.st_ino):
                        return False
            path.unlink(missing_ok=True)
            try:
                self.index.delete_many([digest])
            except CacheFull:  # see evict
                syncfs(self.root)
                self.index.delete_many([digest])
            self.usage -= rec.size
        return True

    def flush(self, touched: Collection[Digest] = ()) -> int:
        """Make every blob committed so far durable (one syncfs) and record the access time
        of ``touched`` blobs (one transaction); returns how many blobs became durable."""
        with self._lock:
            pending, self._pending = self._pending, []
        try:
            if touched:
                self.index.touch_many(touched)
            if not pending:
                return 0
            syncfs(self.root)
            self.index.mark_synced(pending)
            self.index.sync()
        except BaseException:  # a full disk: the next flush tries again
            with self._lock:
                self._pending[:0] = pending
            raise
        return len(pending)

    def reconcile(self) -> Reconciled:
        """Make index and files agree after a crash: drop temp files, index stray blobs,
        forget index entries whose file is gone, remove manifest indexes whose manifest is
        not cached."""
        removed = 0
        for tmp in self.layout.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
        on_disk: dict[Digest, Path] = {}
        for sub in self.layout.blobs.iterdir():
            for f in sub.iterdir():
                if Digest.is_hex(f.name):
                    on_disk[Digest.parse(f.name)] = f
                else:
                    f.unlink()
        indexed = dict(self.index.items())
        doubtful = [d for d in on_disk if d not in indexed or not indexed[d].synced]
        bad = [d for d in doubtful if not _verifies(d, on_disk[d])]
        for d in bad:
            on_disk.pop(d).unlink()
        stale = [d for d in indexed if d not in on_disk]
        self.index.delete_many(stale)
        syncfs(self.root)
        fixed = [
            (
                d,
                BlobRecord(
                    on_disk[d].stat().st_size,
                    indexed[d].last_access_ns if d in indexed else 0,
                    plain=indexed[d].plain if d in indexed else self._plain,
                ),
            )
            for d in doubtful
            if d in on_disk
        ]
        self.index.put_many(fixed)
        refixed = {d for d, _ in fixed}
        plain = [(d, r.size) for d, r in fixed if r.plain]
        plain += [
            (d, r.size) for d, r in indexed.items() if r.plain and d in on_disk and d not in refixed
        ]
        with self._plain_lock:
            self._plain_landed = plain
        self.index.sync()
        with self._lock:
            self.usage = self.index.total_bytes()
        indexes = self._sweep_indexes(on_disk.keys())
        return Reconciled(removed, len(fixed), len(stale) + len(bad), len(on_disk), indexes)

    def _sweep_indexes(self, cached: Collection[Digest]) -> int:
        """Remove manifest indexes whose manifest is not cached (left by a crash between an
        eviction and its sweep, or by versions that never removed them) and index builds a
        crashed mount left half-written (``.<hex>.*``, over an hour old: a mount may be
        writing one now). Returns how many files went."""
        folder = self.layout.manifests
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return 0
        old = time.time() - _BUILD_AGE_S
        removed = 0
        for name in names:
            path = folder / name
            hex_digest, dot, ext = name.partition(".")
            orphan = (
                ext == "idx"
                and Digest.is_hex(hex_digest)
                and (Digest.parse(hex_digest) not in cached)
            )
            try:
                if orphan or (not hex_digest and dot and path.lstat().st_mtime < old):
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


def _disk_error(exc: OSError, digest: Digest) -> CacheFull | OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        err = CacheFull(f"cache disk full while storing {digest}")
        err.__cause__ = exc
        return err
    return exc


def _verifies(digest: Digest, path: Path) -> bool:
    h = Hasher()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest() == digest


_TRANSIENT: Final = frozenset({errno.ENOSPC, errno.EINTR, errno.EAGAIN, errno.EIO})


def filesystem_type(path: Path) -> str:
    """The filesystem type name of ``path`` (``btrfs``, ``ext2/ext3``, ``tmpfs``, ...)."""
    out = subprocess.run(
        ["stat", "-f", "--format=%T", str(path)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def init_cache_dir(path: Path) -> tuple[str, bool]:
    """Create a cache directory; on Btrfs turn zstd compression on for it.

    Returns (filesystem type, compression enabled). New files inherit the property.
    """
    layout = CacheLayout(path)
    for sub in (layout.blobs, layout.tmp):
        sub.mkdir(parents=True, exist_ok=True)
    fs = filesystem_type(path)
    if fs != "btrfs":
        return fs, False
    for target in (path, layout.blobs, layout.tmp):
        set_compression(target, "zstd")
    return fs, True
