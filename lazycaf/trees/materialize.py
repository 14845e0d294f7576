"""``lazycaf materialize``: a full, ordinary, writable copy of an executable on local disk.

Blobs come from the host cache (missing ones are fetched first, in parallel, through the
daemon). On Btrfs every file is a reflink of its cached blob: ``FICLONE`` for one-blob files,
``FICLONERANGE`` to put each chunk at its offset. No byte is copied, extents are shared with
the cache and with other materialized trees, and a write touches only its own extents.
Elsewhere (another filesystem, or the target on another filesystem than the cache) the
bytes are copied, and the caller is told once.

Copies can be forced where reflinks would work (``write_tree(..., copy=True)``,
``lazycaf materialize --copy``): a tree that shares no extents with the cache, and the
baseline ``scripts/bench_cache.py`` measures reflinks against.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lazycaf.core.chunking import chunk_spans
from lazycaf.core.errors import UsageError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest
from lazycaf.host.paths import CacheLayout

__all__ = ["MaterializeResult", "check_target", "write_tree"]

FICLONE: Final = 0x40049409
FICLONERANGE: Final = 0x4020940D
_CLONE_RANGE: Final = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset
_NO_REFLINK: Final = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL})


@dataclass
class MaterializeResult:
    files: int = 0
    reflinked: int = 0
    copied: int = 0
    bytes: int = 0

    @property
    def all_reflinked(self) -> bool:
        return self.copied == 0


def check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"materialize target {target} exists and is not an empty directory")


def _clone_file(src: int, dst: int) -> bool:
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return False
        raise
    return True


def _clone_range(src: int, dst: int, length: int, dest_offset: int) -> bool:
    try:
        fcntl.ioctl(dst, FICLONERANGE, _CLONE_RANGE.pack(src, 0, length, dest_offset))
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return False
        raise
    return True


def _copy(src: int, dst: int, length: int, dest_offset: int) -> None:
    done = 0
    while done < length:
        data = os.pread(src, min(length - done, 1 << 20), done)
        if not data:
            raise OSError(errno.EIO, "short read from the cache")
        done += os.pwrite(dst, data, dest_offset + done)


def _write_file(blobs_fd: int, e: Entry, path: str, chunk_size: int, copy: bool) -> bool:
    """Create one file from its cached blobs, with its mode and mtime; True if every blob
    was reflinked. Paths are strings and blobs are opened relative to ``blobs/``: per-file
    path handling, not the clone itself, is most of the time of a reflinked tree."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        blobs = e.blob_digests()
        spans = chunk_spans(e.size, chunk_size)
        reflinked = not copy
        for digest, (offset, length) in zip(blobs, spans, strict=True):
            if length == 0:
                continue
            src = os.open(
                CacheLayout.blob_name(digest), os.O_RDONLY | os.O_CLOEXEC, dir_fd=blobs_fd
            )
            try:
                if copy:
                    ok = False
                elif len(blobs) == 1:
                    ok = _clone_file(src, fd)
                else:
                    ok = _clone_range(src, fd, length, offset)
                if not ok:
                    reflinked = False
                    _copy(src, fd, length, offset)
            finally:
                os.close(src)
        # the content is complete: mode and mtime now, through the open descriptor
        os.chmod(fd, e.mode)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
    finally:
        os.close(fd)
    return reflinked


def write_tree(
    cache_root: Path, manifest: Manifest, target: Path, *, copy: bool = False
) -> MaterializeResult:
    """Create ``target`` from cached blobs (all must be cached). Sync: run in a thread.

    ``copy=True`` copies bytes even where reflinks work; by default only where they fail."""
    check_target(target)
    target.mkdir(parents=True, exist_ok=True)
    res = MaterializeResult()
    root = str(target)
    blobs_fd = os.open(CacheLayout(cache_root).blobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for e in manifest.entries:
            path = os.path.join(root, e.path)
            if e.kind == DIR:
                os.mkdir(path, 0o700)
            elif e.kind == FILE:
                reflinked = _write_file(blobs_fd, e, path, manifest.chunk_size, copy)
                res.files += 1
                res.bytes += e.size
                res.reflinked += reflinked
                res.copied += not reflinked
            elif e.kind == SYMLINK:
                os.symlink(e.target or "", path)
                os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
            elif e.kind == HARDLINK:
                os.link(os.path.join(root, e.target or ""), path)
    finally:
        os.close(blobs_fd)
    # directories last, deepest first, so writing into a directory does not move its mtime
    # afterwards (files got theirs as they were written; a hard link does not change it)
    for e in reversed(manifest.entries):
        if e.kind == DIR:
            path = os.path.join(root, e.path)
            os.chmod(path, e.mode)
            os.utime(path, ns=(e.mtime_ns, e.mtime_ns))
    os.chmod(target, manifest.root_mode)
    os.utime(target, ns=(manifest.root_mtime_ns, manifest.root_mtime_ns))
    return res
