"""Where the host index's LMDB lock file lives: off the cache disk, written in full.

Every process that opens the index (the daemon writes; mounts and ``cache status`` read)
writes to LMDB's lock file (``<index>/lock.mdb``: the writer's mutex and a slot a reader)
through a shared mapping. A write to a mapped page the kernel has written back is a page
fault the filesystem must find space for: Btrfs copies the page, and LMDB makes the file
sparse, so on a full cache disk the fault ends in SIGBUS and the process dies on the spot, no
exception, no log line (a mount and its daemon died so while the cache disk was full).

For root (who runs the fetcher service and a fleet's mounts), the lock file lives in
``/run/lazycaf/index-locks/`` (a tmpfs on systemd hosts; only root can write under /run, so no
other user can plant a file or a link there: /dev/shm would let them) and ``lock.mdb`` is a
symlink to it, which LMDB follows. The file is named by the index directory's real path (a
copy, a snapshot or another view of the cache gets a name of its own) and is written in full
(zeros, no holes) by the first process to open the index, under LMDB's own exclusive lock
(byte 0 of the file), so no later page fault needs space even where /run is a disk.

``prepare_lock`` (every opener, before LMDB opens the environment):
- a link to this index's name: its file is made (after a reboot) and filled if need be;
- a link anywhere else (the cache was copied, moved or snapshotted, or the name scheme
  changed): re-pointed without opening the old target, which belongs to another index; a
  reader refuses it instead (``LockElsewhere``) and leaves the fix to the daemon;
- a regular file (a cache made before this): moved only while no other process has the index
  open, and emptied, so a process that opened it meanwhile sees the path change (``Index``
  compares the lock file before and after LMDB opens it, and opens again).
It returns a descriptor of the lock file that the caller keeps open until the environment
closes: POSIX locks belong to the process, so closing any descriptor of the file would drop
LMDB's own locks. Another user's index keeps its lock file in the index directory, as LMDB
makes it (systemd-logind deletes a user's runtime files at logout, which would split the lock
under a running daemon).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Final

from lazycaf.core.errors import Unavailable

__all__ = ["LOCK_DIR", "LOCK_NAME", "LockElsewhere", "forget_lock", "lock_target", "prepare_lock"]

log = logging.getLogger(__name__)

LOCK_NAME: Final = "lock.mdb"
LOCK_DIR: Final = Path("/run/lazycaf/index-locks")
# LMDB's lock file: a 192-byte header and 64 bytes a reader; a larger file is kept as it is
# (more reader slots), so this covers max_readers=512 and more
LOCK_SIZE: Final = 64 << 10


class LockElsewhere(Unavailable):
    """A reader found the index's lock file link pointing at another index's lock file."""


def _lock_dir() -> Path | None:
    """``LOCK_DIR``, made if missing, for root; None for another user, or when it (or
    /run/lazycaf) is not root's own directory that only root can write."""
    if os.geteuid() != 0:
        return None
    try:
        for path, mode in ((LOCK_DIR.parent, 0o755), (LOCK_DIR, 0o700)):
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=mode)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                log.warning("%s is not root's own directory: index locks stay on disk", path)
                return None
    except OSError as exc:
        log.warning("no directory for index locks (%s): they stay on disk", exc)
        return None
    return LOCK_DIR


def lock_target(index: Path, directory: Path = LOCK_DIR) -> Path:
    """The lock file of the index directory ``index``, named by its real path."""
    real = os.path.realpath(index)
    return directory / f"index-{hashlib.sha256(real.encode()).hexdigest()[:32]}.lock"


def prepare_lock(index: Path, *, readonly: bool) -> int | None:
    """Point ``<index>/lock.mdb`` at its file in ``LOCK_DIR`` (see the module's docstring);
    returns the descriptor to keep until the environment closes, or None (the lock file
    stays where it is)."""
    directory = _lock_dir()
    if directory is None:
        return None
    link = index / LOCK_NAME
    target = lock_target(index, directory)
    try:
        current = os.readlink(link)
    except FileNotFoundError:
        current = None  # a new index
    except OSError:  # EINVAL: a regular file, a cache made before this
        return None if readonly else _move_regular(link, target)
    if current is not None and current != str(target):
        if readonly:
            raise LockElsewhere(
                f"cannot open cache index {index}: its lock file link points at {current}, "
                f"not {target} (the cache was copied or moved): start its fetcher daemon "
                "first, which points it right"
            )
        _point(link, target)  # the old target is another index's: never opened
    elif current is None:
        if readonly:
            return None  # no index here: LMDB says so
        _point(link, target)
    return _open_filled(target)


def _move_regular(link: Path, target: Path) -> int | None:
    """Replace the regular lock file ``link`` by a link to ``target``, if no other process
    has the index open; the descriptor of ``target``, or None (moved on a later start)."""
    old = os.open(link, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:  # LMDB's exclusive lock: whoever holds it is the only user of the file
            fcntl.lockf(old, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
        except OSError:
            log.info("index %s is open elsewhere: its lock file moves on a later start", link)
            return None
        _point(link, target)
        os.ftruncate(old, 0)  # a process that opened it meanwhile finds nothing to share
    finally:
        os.close(old)
    return _open_filled(target)


def _point(link: Path, target: Path) -> None:
    temp = link.with_name(f".{LOCK_NAME}.{os.getpid()}")
    temp.unlink(missing_ok=True)
    os.symlink(target, temp)
    os.replace(temp, link)


def _open_filled(target: Path) -> int:
    """Open (or make) ``target``; when no process has it open, write it in full."""
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
        except OSError:  # in use: whoever opened it first filled it
            return fd
        # LMDB, opened next in this process, takes the lock over (the process owns it), so
        # nobody sees the file between the fill and LMDB's set-up
        st = os.fstat(fd)
        if st.st_size < LOCK_SIZE or st.st_blocks * 512 < st.st_size:
            zeros = bytes(LOCK_SIZE)
            done = 0
            while done < LOCK_SIZE:
                done += os.pwrite(fd, zeros[done:], done)
    except BaseException:
        os.close(fd)
        raise
    return fd


def forget_lock(index: Path) -> None:
    """Remove the lock file of an index about to be deleted with its cache (nothing else
    removes it; a reboot does, where /run is a tmpfs)."""
    with contextlib.suppress(OSError):
        target = Path(os.readlink(index / LOCK_NAME))
        if target.parent == LOCK_DIR:
            target.unlink()
