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

A manifest is untrusted input, and the tree is all or nothing:

- **Modes.** setuid and setgid (``0o6000``) are cleared on every file and directory, and
  write for others (``0o002``) on every directory, the root included, unless
  ``keep_setid``: a manifest must not hand a root user a setuid binary, nor a directory
  anyone can write into (``mode_on_disk``).
- **Sizes.** Every blob must be exactly as long as the manifest says its span is (a
  chunk's length, or the file's size), on the reflink and the copy path alike: the size is
  part of what the digest promises. A mismatch is an ``IntegrityError``.
- **All or nothing.** The tree is built in a hidden sibling of the target
  (``.lazycaf-materialize-*`` in the same parent) and renamed into place at the end. On any
  failure (an OS error, an integrity error, ``stop`` set by a signal) the sibling and the
  parents this call created are removed; an OS error becomes one ``LazyCafError`` naming the
  entry. Only a SIGKILL can leave the sibling behind.
- **Lengths.** Entries are created relative to the sibling's descriptor, so no absolute path
  is handed to the kernel; instead, a tree whose longest path under the target would reach
  ``PATH_MAX`` is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lazycaf.core.chunking import chunk_spans
from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError, LazyCafError, Unavailable, UsageError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest
from lazycaf.host.paths import CacheLayout

__all__ = ["MaterializeResult", "check_target", "mode_on_disk", "write_tree"]

FICLONE: Final = 0x40049409
FICLONERANGE: Final = 0x4020940D
_CLONE_RANGE: Final = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset
_NO_REFLINK: Final = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL})
_SETID: Final = stat.S_ISUID | stat.S_ISGID
_PATH_MAX: Final = 4096  # Linux, with the terminating NUL
_DISK_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
_EMPTY: Final = Digest.of(b"")
_TMP_PREFIX: Final = ".lazycaf-materialize-"


@dataclass
class MaterializeResult:
    """What ``write_tree`` wrote: entries by kind (the root not counted), the files' bytes,
    and how many files were reflinked or copied (``files == reflinked + copied``)."""

    files: int = 0
    reflinked: int = 0
    copied: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0

    @property
    def all_reflinked(self) -> bool:
        return self.copied == 0


def mode_on_disk(kind: str, mode: int, *, keep_setid: bool = False) -> int:
    """The permission bits an entry of ``kind`` (the root counts as a directory) gets:
    setuid/setgid cleared, and others-write on directories, unless ``keep_setid``."""
    if keep_setid:
        return mode
    return mode & ~(_SETID | (stat.S_IWOTH if kind == DIR else 0))


def check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"materialize target {target} exists and is not an empty directory")


def _check_lengths(target: Path, manifest: Manifest) -> None:
    """Refuse a tree whose longest path under ``target`` would reach PATH_MAX."""
    if not manifest.entries:
        return
    longest = max(manifest.entries, key=lambda e: len(e.path.encode()))
    length = len(os.fsencode(target)) + 1 + len(longest.path.encode())
    if length >= _PATH_MAX:
        raise UsageError(
            f"entry {longest.path[:60]!r}... would be a path of {length} bytes under "
            f"{target}, over PATH_MAX ({_PATH_MAX}): choose a shorter target"
        )


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


def _copy(src: int, dst: int, length: int, dest_offset: int, stop: threading.Event) -> None:
    done = 0
    while done < length:
        if stop.is_set():
            raise KeyboardInterrupt
        data = os.pread(src, min(length - done, 1 << 20), done)
        if not data:
            raise OSError(errno.EIO, "short read from the cache")
        done += os.pwrite(dst, data, dest_offset + done)


@dataclass(frozen=True)
class _Job:
    """What every entry of one ``write_tree`` call shares."""

    root_fd: int
    blobs_fd: int
    chunk_size: int
    copy: bool
    keep_setid: bool
    stop: threading.Event
    on_entry: Callable[[], None] | None = None


def _open_blob(job: _Job, e: Entry, digest: Digest, length: int) -> int:
    """The cached blob of one span of ``e``, checked to be exactly ``length`` bytes long."""
    try:
        src = os.open(
            CacheLayout.blob_name(digest), os.O_RDONLY | os.O_CLOEXEC, dir_fd=job.blobs_fd
        )
    except FileNotFoundError:
        raise Unavailable(
            f"blob {digest} of {e.path!r} left the host cache (evicted by GC?): try again"
        ) from None
    actual = os.fstat(src).st_size
    if actual != length:
        os.close(src)
        raise IntegrityError(
            f"blob {digest} of {e.path!r} is {actual} bytes long, the manifest says {length}"
        )
    return src


def _write_file(job: _Job, e: Entry) -> bool:
    """Create one file from its cached blobs, with its mode and mtime; True if every blob
    was reflinked. Blobs are opened relative to ``blobs/`` and the file relative to the
    tree: per-file path handling, not the clone itself, is most of the time of a reflinked
    tree."""
    fd = os.open(
        e.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=job.root_fd
    )
    try:
        blobs = e.blob_digests()
        reflinked = not job.copy
        for digest, (offset, length) in zip(
            blobs, chunk_spans(e.size, job.chunk_size), strict=True
        ):
            if length == 0:  # an empty file: its digest must say so, there is nothing to read
                if digest != _EMPTY:
                    raise IntegrityError(f"blob {digest} of {e.path!r}: the manifest says 0 bytes")
                continue
            src = _open_blob(job, e, digest, length)
            try:
                if job.copy:
                    ok = False
                elif len(blobs) == 1:
                    ok = _clone_file(src, fd)
                else:
                    ok = _clone_range(src, fd, length, offset)
                if not ok:
                    reflinked = False
                    _copy(src, fd, length, offset, job.stop)
            finally:
                os.close(src)
        # the content is complete: mode and mtime now, through the open descriptor
        os.chmod(fd, mode_on_disk(FILE, e.mode, keep_setid=job.keep_setid))
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
    finally:
        os.close(fd)
    return reflinked


def _write_entry(job: _Job, e: Entry, res: MaterializeResult) -> None:
    if e.kind == DIR:
        os.mkdir(e.path, 0o700, dir_fd=job.root_fd)
        res.dirs += 1
    elif e.kind == FILE:
        reflinked = _write_file(job, e)
        res.files += 1
        res.bytes += e.size
        res.reflinked += reflinked
        res.copied += not reflinked
    elif e.kind == SYMLINK:
        os.symlink(e.target or "", e.path, dir_fd=job.root_fd)
        os.utime(e.path, ns=(e.mtime_ns, e.mtime_ns), dir_fd=job.root_fd, follow_symlinks=False)
        res.symlinks += 1
    elif e.kind == HARDLINK:
        os.link(
            e.target or "",
            e.path,
            src_dir_fd=job.root_fd,
            dst_dir_fd=job.root_fd,
            follow_symlinks=False,
        )
        res.hardlinks += 1


def _os_error(exc: OSError, what: str, target: Path) -> LazyCafError:
    """One line for an OS error: the disk's own failures are Unavailable (exit 3), anything
    else (a name or link the filesystem refuses, permissions) a UsageError (exit 2)."""
    reason = exc.strerror or str(exc)
    cls = Unavailable if exc.errno in _DISK_ERRNOS else UsageError
    return cls(f"cannot materialize {what} at {target}: {reason}")


def _fill(job: _Job, manifest: Manifest, target: Path, res: MaterializeResult) -> None:
    """Write every entry into the tree ``job.root_fd`` names, then the directories' modes
    and mtimes, deepest first, so writing into a directory does not move its mtime
    afterwards (files got theirs as they were written; a hard link does not change it)."""
    for e in manifest.entries:
        if job.stop.is_set():
            raise KeyboardInterrupt
        try:
            _write_entry(job, e, res)
        except OSError as exc:
            raise _os_error(exc, repr(e.path), target) from exc
        if job.on_entry is not None:
            job.on_entry()
    for e in reversed(manifest.entries):
        if e.kind == DIR:
            mode = mode_on_disk(DIR, e.mode, keep_setid=job.keep_setid)
            try:
                os.chmod(e.path, mode, dir_fd=job.root_fd)
                os.utime(e.path, ns=(e.mtime_ns, e.mtime_ns), dir_fd=job.root_fd)
            except OSError as exc:
                raise _os_error(exc, repr(e.path), target) from exc
    root_mode = mode_on_disk(DIR, manifest.root_mode, keep_setid=job.keep_setid)
    os.chmod(job.root_fd, root_mode)
    os.utime(job.root_fd, ns=(manifest.root_mtime_ns, manifest.root_mtime_ns))


def _make_parents(parent: Path) -> Path | None:
    """Create ``parent`` and its missing ancestors; the topmost one created, if any."""
    missing = None
    p = parent
    while not p.exists() and p != p.parent:
        missing, p = p, p.parent
    if missing is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_parents(top: Path | None, parent: Path) -> None:
    """Remove the parents ``_make_parents`` created, innermost first, if they are empty."""
    if top is None:
        return
    p = parent
    while True:
        with contextlib.suppress(OSError):
            p.rmdir()
        if p == top:
            return
        p = p.parent


def write_tree(
    cache_root: Path,
    manifest: Manifest,
    target: Path,
    *,
    copy: bool = False,
    keep_setid: bool = False,
    stop: threading.Event | None = None,
    on_entry: Callable[[], None] | None = None,
) -> MaterializeResult:
    """Create ``target`` from cached blobs (all must be cached). Sync: run in a thread.

    ``copy=True`` copies bytes even where reflinks work; by default only where they fail.
    ``keep_setid`` keeps the manifest's modes as they are (see the module docstring).
    ``stop``: once set (from a signal handler), the build stops, the partial tree is
    removed and ``KeyboardInterrupt`` is raised. ``on_entry`` is called after each entry
    written (a progress bar's callback). All or nothing: on any error ``target`` is left as
    it was."""
    target = Path(os.path.abspath(target))
    check_target(target)
    _check_lengths(target, manifest)
    try:
        created = _make_parents(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=target.parent))
    except OSError as exc:
        raise _os_error(exc, "a tree", target) from exc
    try:
        res = _build(cache_root, manifest, tmp, target, copy, keep_setid, stop, on_entry)
        _publish(tmp, target, manifest.root_mtime_ns)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_parents(created, target.parent)
        raise
    return res


def _build(
    cache_root: Path,
    manifest: Manifest,
    tmp: Path,
    target: Path,
    copy: bool,
    keep_setid: bool,
    stop: threading.Event | None,
    on_entry: Callable[[], None] | None,
) -> MaterializeResult:
    res = MaterializeResult()
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        blobs_fd = os.open(CacheLayout(cache_root).blobs, flags)
    except OSError as exc:
        raise Unavailable(f"cannot open the host cache {cache_root}: {exc.strerror}") from exc
    try:
        root_fd = os.open(tmp, flags)
        try:
            stop = stop or threading.Event()
            job = _Job(root_fd, blobs_fd, manifest.chunk_size, copy, keep_setid, stop, on_entry)
            _fill(job, manifest, target, res)
        finally:
            os.close(root_fd)
    finally:
        os.close(blobs_fd)
    return res


def _publish(tmp: Path, target: Path, root_mtime_ns: int) -> None:
    """Rename the finished tree onto ``target`` (absent, or an empty directory)."""
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise UsageError(
                f"materialize target {target} exists and is not an empty directory"
            ) from exc
        raise _os_error(exc, "the tree", target) from exc
    # a rename may count as a change of the directory: its mtime once more
    os.utime(target, ns=(root_mtime_ns, root_mtime_ns))
