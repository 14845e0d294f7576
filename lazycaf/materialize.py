"""``lazycaf materialize``: a full, ordinary, writable copy of an executable on local disk.

Blobs come from the host cache (missing ones are fetched first, in parallel, through the
daemon). On Btrfs every file is a reflink of its cached blob: ``FICLONE`` for one-blob files,
``FICLONERANGE`` to put each chunk at its offset. No byte is copied, extents are shared with
the cache and with other materialized trees, and a write touches only its own extents.
Elsewhere (another filesystem, or the target on another filesystem than the cache) the
bytes are copied, and the caller is told once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lazycaf.chunking import chunk_spans
from lazycaf.errors import UsageError
from lazycaf.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest

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


def _blob(cache_root: Path, hex_digest: str) -> Path:
    return cache_root / "blobs" / hex_digest[:2] / hex_digest


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


def _write_file(
    cache_root: Path, e: Entry, path: Path, chunk_size: int, res: MaterializeResult
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        blobs = e.blob_digests()
        spans = chunk_spans(e.size, chunk_size)
        reflinked = True
        for digest, (offset, length) in zip(blobs, spans, strict=True):
            if length == 0:
                continue
            src = os.open(_blob(cache_root, digest.hex), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if len(blobs) == 1:
                    ok = _clone_file(src, fd)
                else:
                    ok = _clone_range(src, fd, length, offset)
                if not ok:
                    reflinked = False
                    _copy(src, fd, length, offset)
            finally:
                os.close(src)
        res.files += 1
        res.bytes += e.size
        res.reflinked += reflinked
        res.copied += not reflinked
    finally:
        os.close(fd)


def write_tree(cache_root: Path, manifest: Manifest, target: Path) -> MaterializeResult:
    """Create ``target`` from cached blobs (all must be cached). Sync: run in a thread."""
    check_target(target)
    target.mkdir(parents=True, exist_ok=True)
    res = MaterializeResult()
    for e in manifest.entries:
        path = target / e.path
        if e.kind == DIR:
            path.mkdir(mode=0o700)
        elif e.kind == FILE:
            _write_file(cache_root, e, path, manifest.chunk_size, res)
        elif e.kind == SYMLINK:
            os.symlink(e.target or "", path)
            os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        elif e.kind == HARDLINK:
            os.link(target / (e.target or ""), path)
    # attributes last (files first, then directories deepest first), so writing into a
    # directory does not move its mtime afterwards
    for e in manifest.entries:
        if e.kind == FILE:
            path = target / e.path
            os.chmod(path, e.mode)
            os.utime(path, ns=(e.mtime_ns, e.mtime_ns))
    for e in reversed(manifest.entries):
        if e.kind == DIR:
            path = target / e.path
            os.chmod(path, e.mode)
            os.utime(path, ns=(e.mtime_ns, e.mtime_ns))
    os.chmod(target, manifest.root_mode)
    os.utime(target, ns=(manifest.root_mtime_ns, manifest.root_mtime_ns))
    return res
