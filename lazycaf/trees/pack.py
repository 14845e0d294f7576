"""Packing: walk a tree, hash it in threads, build the manifest, upload what the CAS lacks.

``pack()`` is the whole pipeline; the walk and the hashing are sync functions run in worker
threads (both cores). Missing blobs are uploaded in batches (``CAS.put_many``: one durable
commit per batch instead of one fsync per blob), a few batches in flight so that reading the
tree, compressing and committing overlap. The manifest is uploaded last, after every blob it
names, so a manifest in the CAS is always complete.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

import trio

from lazycaf.cas.api import CAS
from lazycaf.core.chunking import DEFAULT_CHUNK_SIZE, chunk_spans
from lazycaf.core.digest import Digest, Hasher
from lazycaf.core.errors import PackError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, PATH_MAX, SYMLINK, Entry, Manifest
from lazycaf.trees.statcache import StatCache, StatKey

__all__ = ["PackProgress", "PackResult", "pack", "scan_tree"]

_HASH_BATCH_BYTES: Final = 16 << 20
_HASH_BATCH_FILES: Final = 256
_READ_SIZE: Final = 1 << 20
_UPLOAD_BATCH_BYTES: Final = 16 << 20
_UPLOAD_BATCH_BLOBS: Final = 256
_MAX_BATCHES_IN_FLIGHT: Final = 4  # each holds up to ~16 MiB (plus its compressed copy)


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

    @property
    def blobs_skipped(self) -> int:
        return self.blobs - self.blobs_missing


@dataclass(frozen=True)
class PackResult:
    digest: Digest
    manifest: Manifest
    progress: PackProgress = field(compare=False)


Upload = tuple[Digest, tuple[str, int, int]]  # a blob and where it is: (path, offset, length)


class Scanned(NamedTuple):
    """One path as the walk saw it; ``inode`` groups hard links."""

    path: str
    kind: str
    mode: int
    mtime_ns: int
    size: int
    target: str | None = None
    inode: tuple[int, int] | None = None
    key: StatKey | None = None


def scan_tree(root: Path, *, keep_setid: bool = False) -> tuple[os.stat_result, list[Scanned]]:
    """Walk ``root`` without following symlinks; refuse what a manifest cannot hold."""
    try:
        root_st = os.stat(root)
    except OSError as exc:
        raise PackError(f"cannot pack {root}: {exc.strerror}") from exc
    if not stat.S_ISDIR(root_st.st_mode):
        raise PackError(f"cannot pack {root}: not a directory")
    mask = 0o7777 if keep_setid else 0o1777
    out: list[Scanned] = []
    for rel, st in _walk(root):
        m = st.st_mode
        mode = stat.S_IMODE(m) & mask
        if stat.S_ISDIR(m):
            out.append(Scanned(rel, DIR, mode, st.st_mtime_ns, 0))
        elif stat.S_ISREG(m):
            inode = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
            key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
            out.append(Scanned(rel, FILE, mode, st.st_mtime_ns, st.st_size, inode=inode, key=key))
        elif stat.S_ISLNK(m):
            try:
                target = os.readlink(root / rel)
            except OSError as exc:
                raise PackError(f"cannot read link {_shown(root, rel)}: {exc.strerror}") from exc
            _check_utf8(target, f"{rel} (symlink target)")
            out.append(Scanned(rel, SYMLINK, 0o777, st.st_mtime_ns, len(target.encode()), target))
        else:
            kind = "device" if stat.S_ISBLK(m) or stat.S_ISCHR(m) else _odd_kind(m)
            raise PackError(f"cannot pack {root / rel}: a {kind} (only files, dirs and links)")
    out.sort(key=lambda s: s.path)
    return root_st, out


def _odd_kind(mode: int) -> str:
    return "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "special file"


def _check_utf8(name: str, where: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise PackError(f"cannot pack {where!r}: name is not valid UTF-8") from None


def _shown(root: Path, rel: str, *, keep: int = 100) -> str:
    """``root/rel`` for a one-line message, its middle cut when it is long (a path deeper
    than PATH_MAX would fill a screen)."""
    path = str(root / rel) if rel else str(root)
    if len(path) <= 2 * keep:
        return path
    return f"{path[:keep]}...{path[-keep:]} ({len(path.encode())} bytes)"


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every path below ``root`` and its lstat. Any OSError (ENAMETOOLONG, EACCES, a file
    removed meanwhile) and any path a manifest could not hold end the walk as a one-line
    ``PackError`` naming the path."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(root / rel_dir if rel_dir else root) as it:
                entries = list(it)
        except OSError as exc:
            raise PackError(
                f"cannot read directory {_shown(root, rel_dir)}: {exc.strerror}"
            ) from exc
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            _check_utf8(entry.name, _shown(root, rel))
            if len(rel.encode()) > PATH_MAX:
                raise PackError(
                    f"cannot pack {_shown(root, rel)}: its path below {root} is "
                    f"{len(rel.encode())} bytes long (a manifest holds at most {PATH_MAX})"
                )
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise PackError(f"cannot stat {_shown(root, rel)}: {exc.strerror}") from exc
            yield rel, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)


def hash_file(path: Path, size: int, chunk_size: int) -> tuple[Digest, tuple[Digest, ...]]:
    """(whole-content digest, chunk digests) of a file; chunks are empty for one-blob files."""
    try:
        with open(path, "rb") as f:
            if size <= chunk_size:
                data = f.read()
                if len(data) != size:
                    raise PackError(f"{path} changed size while packing")
                return Digest.of(data), ()
            whole = Hasher()
            chunks = []
            for _, length in chunk_spans(size, chunk_size):
                data = f.read(length)
                if len(data) != length:
                    raise PackError(f"{path} changed size while packing")
                whole.update(data)
                chunks.append(Digest.of(data))
            return whole.digest(), tuple(chunks)
    except OSError as exc:
        raise PackError(f"cannot read {path}: {exc.strerror}") from exc


def read_blob(path: Path, offset: int, length: int, digest: Digest) -> bytes:
    """Read one blob's bytes back from the tree and check they still hash as they did."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as exc:
        raise PackError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) != length or Digest.of(data) != digest:
        raise PackError(f"{path} changed while packing (blob {digest.short} no longer matches)")
    return data


def read_blobs(root: Path, batch: list[Upload]) -> list[tuple[Digest, bytes]]:
    """``read_blob`` for each blob of an upload batch (one thread hop for the batch)."""
    return [(d, read_blob(root / path, off, length, d)) for d, (path, off, length) in batch]


def _hash_batch(
    root: Path, batch: list[Scanned], chunk_size: int
) -> list[tuple[Digest, tuple[Digest, ...]]]:
    return [hash_file(root / s.path, s.size, chunk_size) for s in batch]


def _upload_batches(todo: list[Upload]) -> Iterator[list[Upload]]:
    """Up to ``_UPLOAD_BATCH_BLOBS`` blobs or ``_UPLOAD_BATCH_BYTES`` each (a bigger blob
    goes alone)."""
    batch: list[Upload] = []
    size = 0
    for item in todo:
        length = item[1][2]
        if batch and (size + length > _UPLOAD_BATCH_BYTES or len(batch) >= _UPLOAD_BATCH_BLOBS):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += length
    if batch:
        yield batch


def _batches(files: list[Scanned]) -> Iterator[list[Scanned]]:
    batch: list[Scanned] = []
    size = 0
    for s in files:
        batch.append(s)
        size += s.size
        if size >= _HASH_BATCH_BYTES or len(batch) >= _HASH_BATCH_FILES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


async def _hash_all(
    root: Path, files: list[Scanned], chunk_size: int, progress: PackProgress
) -> dict[str, tuple[Digest, tuple[Digest, ...]]]:
    """Hash files in batches on two threads (per-file thread hops would cost more than
    hashing small files)."""
    results: dict[str, tuple[Digest, tuple[Digest, ...]]] = {}
    limiter = trio.CapacityLimiter(max(2, min(4, os.cpu_count() or 2)))

    async def run(batch: list[Scanned]) -> None:
        hashed = await trio.to_thread.run_sync(
            _hash_batch, root, batch, chunk_size, limiter=limiter
        )
        for s, h in zip(batch, hashed, strict=True):
            results[s.path] = h
            progress.files_hashed += 1
            progress.bytes_hashed += s.size

    async with trio.open_nursery() as nursery:
        for batch in _batches(files):
            nursery.start_soon(run, batch)
    return results


def build_manifest(
    root_st: os.stat_result,
    scanned: list[Scanned],
    hashes: dict[str, tuple[Digest, tuple[Digest, ...]]],
    chunk_size: int,
    *,
    keep_setid: bool = False,
) -> Manifest:
    entries: list[Entry] = []
    first_of_inode: dict[tuple[int, int], Entry] = {}
    for s in scanned:  # sorted: the first path of an inode group is the file
        if s.kind != FILE:
            entries.append(Entry(s.path, s.kind, s.mode, s.mtime_ns, s.size, target=s.target))
            continue
        if s.inode is not None and s.inode in first_of_inode:
            f = first_of_inode[s.inode]
            entries.append(f._replace(path=s.path, kind=HARDLINK, target=f.path))
            continue
        digest, chunks = hashes[s.path]
        e = Entry(s.path, FILE, s.mode, s.mtime_ns, s.size, digest, chunks)
        entries.append(e)
        if s.inode is not None:
            first_of_inode[s.inode] = e
    mask = 0o7777 if keep_setid else 0o1777
    return Manifest(
        entries,
        chunk_size=chunk_size,
        root_mode=stat.S_IMODE(root_st.st_mode) & mask,
        root_mtime_ns=root_st.st_mtime_ns,
    )


def blob_sources(manifest: Manifest) -> dict[Digest, tuple[str, int, int]]:
    """Where each blob's bytes are in the tree: digest -> (path, offset, length)."""
    out: dict[Digest, tuple[str, int, int]] = {}
    for e in manifest.entries:
        if e.kind != FILE:
            continue
        spans = chunk_spans(e.size, manifest.chunk_size)
        for d, (off, length) in zip(e.blob_digests(), spans, strict=True):
            out.setdefault(d, (e.path, off, length))
    return out


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
) -> PackResult:
    """Pack ``root`` into ``cas``; returns the manifest digest that names the executable.

    ``concurrency`` bounds the upload batches in flight (at most 4); an HTTP CAS keeps up to
    8 PUTs of them in flight (``HttpCAS``'s ``put_concurrency``)."""
    progress = progress if progress is not None else PackProgress()
    root_st, scanned = await trio.to_thread.run_sync(
        functools.partial(scan_tree, root, keep_setid=keep_setid)
    )
    files = [s for s in scanned if s.kind == FILE]
    progress.files = len(files)
    progress.bytes_total = sum(s.size for s in files)
    progress.phase = "hashing"
    seen: set[tuple[int, int]] = set()
    unique = []
    for s in files:
        if s.inode is None or s.inode not in seen:
            unique.append(s)
            if s.inode is not None:
                seen.add(s.inode)
    statcache = (
        StatCache.for_tree(stat_cache_dir, root, chunk_size) if stat_cache_dir is not None else None
    )
    hashes: dict[str, tuple[Digest, tuple[Digest, ...]]] = {}
    if statcache is not None:
        for s in unique:
            assert s.key is not None
            known = statcache.lookup(s.path, s.key)
            if known is not None:
                hashes[s.path] = known
                progress.files_hashed += 1
                progress.bytes_hashed += s.size
    todo = [s for s in unique if s.path not in hashes]
    hashes.update(await _hash_all(root, todo, chunk_size, progress))
    manifest = build_manifest(root_st, scanned, hashes, chunk_size, keep_setid=keep_setid)
    progress.phase = "checking"
    sources = blob_sources(manifest)
    progress.blobs = len(sources)
    missing = await cas.find_missing(list(sources))
    progress.blobs_missing = len(missing)
    progress.phase = "uploading"
    await _upload(
        root, cas, [(d, sources[d]) for d in sources if d in missing], concurrency, progress
    )
    encoded = manifest.encode()
    digest = Digest.of(encoded)
    await cas.put(digest, encoded)
    if tag:
        await cas.set_ref(tag, digest)
    if statcache is not None:
        for s in unique:
            assert s.key is not None
            statcache.record(s.path, s.key, *hashes[s.path])
        await trio.to_thread.run_sync(statcache.save)
    progress.phase = "done"
    return PackResult(digest, manifest, progress)


async def _upload(
    root: Path,
    cas: CAS,
    todo: list[Upload],
    concurrency: int,
    progress: PackProgress,
) -> None:
    """Upload ``todo`` in batches, ``concurrency`` batches in flight (at most 4): while one
    batch commits, the next is read and verified in a worker thread. ``PackProgress`` counts
    a batch's blobs once its ``put_many`` has completed."""
    send, receive = trio.open_memory_channel[list[Upload]](0)

    async def worker(receive: trio.MemoryReceiveChannel[list[Upload]]) -> None:
        async with receive:
            async for batch in receive:
                items = await trio.to_thread.run_sync(read_blobs, root, batch)
                await cas.put_many(items)
                progress.blobs_uploaded += len(batch)
                progress.bytes_uploaded += sum(len(data) for _, data in items)

    async with trio.open_nursery() as nursery:
        async with receive:
            for _ in range(max(1, min(concurrency, _MAX_BATCHES_IN_FLIGHT))):
                nursery.start_soon(worker, receive.clone())
        async with send:
            for batch in _upload_batches(todo):
                await send.send(batch)
