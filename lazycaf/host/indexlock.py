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
symlink to it, which LMDB follows. The file is named by the index directory's device and
inode (a copy or a snapshot gets a name of its own, a bind mount the same one) and is written
in full (zeros, no holes) by the first process to open the index, under LMDB's own exclusive
lock (byte 0 of the file), so no later page fault needs space where /run is tmpfs, ext4 or
xfs (on a Btrfs /run a write fault still reserves space).

``prepare_lock`` (every opener, before LMDB opens the environment):
- a link to this index's name: its file is made (after a reboot) and filled if need be; a
  reader makes it only while no daemon holds the cache's ``fetcher.lock``; while one does, a
  file that is missing or that nobody uses (after a wait of ``_DAEMON_WAIT``: the daemon
  takes its lock before it opens the index) means this process sees another /run than the
  daemon's (a container, a removed directory), and it refuses instead of locking apart;
- a link anywhere else (the cache was copied or snapshotted, its disk remounted with another
  device number, the machine rebooted): re-pointed without opening the old target, which is
  another index's or nobody's; a reader does it only while no daemon runs and no process
  uses the old target, else refuses (``LockElsewhere``) and leaves it to the daemon;
- a regular file (a cache made before this): moved by the writer only while no other process
  has the index open, and emptied, so a process that opened it meanwhile sees the path change
  (``Index`` compares the lock file before and after LMDB opens it, and opens again).
It returns a descriptor of the lock file that the caller keeps open until the environment
closes: POSIX locks belong to the process, so closing any descriptor of the file would drop
LMDB's own locks. Another user's index keeps its lock file in the index directory, as LMDB
makes it (systemd-logind deletes a user's runtime files at logout, which would split the lock
under a running daemon).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import time
from pathlib import Path
from typing import Final

from lazycaf.core.errors import Unavailable
from lazycaf.host.paths import CacheLayout

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
    """The lock file of the index directory ``index``, named by its device and inode: a copy
    or a snapshot gets another name, another path to the same directory (a bind mount, a
    symlink) the same one."""
    st = os.stat(index)
    return directory / f"index-{st.st_dev:x}-{st.st_ino:x}.lock"


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
    if current is None and readonly:
        return None  # no index here: LMDB says so
    if current != str(target):
        # a new index; or a copy, a snapshot, a remount that renumbered the device, a
        # reboot: the old target is another index's or nobody's, so the writer never opens
        # it. A reader re-points only while no daemon runs and nobody uses the old target
        # (else the daemon does, on start; or the original of a copy is using it)
        if readonly and (_daemon_runs(index) or (current and _in_use(current))):
            raise LockElsewhere(
                f"cannot open cache index {index}: its lock file link points at {current}, "
                f"not {target} (the cache was copied or moved, or its disk remounted): "
                "start its fetcher daemon first, which points it right"
            )
        _point(link, target)
    return _open_filled(index, target, readonly=readonly)


def _lock_alone(fd: int) -> bool:
    """Take LMDB's exclusive lock (byte 0) on ``fd`` if no other process holds it: then no
    other process has the environment open through this file."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
    except OSError:
        return False
    return True


def _in_use(path: str) -> bool:
    """Whether some process has the lock file ``path`` open through LMDB (it holds byte 0).
    A file this process has open counts as in use without a test: closing the descriptor
    the test opens would drop this process's own locks on it."""
    if _open_here(path):
        return True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:  # not ours to judge (a link, another owner): leave it to the daemon
        return True
    try:
        return not _lock_alone(fd)
    finally:
        os.close(fd)  # no environment of this process uses it: nothing else to drop


def _open_here(path: str) -> bool:
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"/proc/self/fd/{name}") == path:
                return True
    return False


def _daemon_runs(index: Path) -> bool:
    """Whether a daemon (or an offline GC) holds the cache's ``fetcher.lock``."""
    try:
        fd = os.open(CacheLayout(index.parent).lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _move_regular(link: Path, target: Path) -> int | None:
    """Replace the regular lock file ``link`` by a link to ``target``, if no other process
    has the index open; the descriptor of ``target``, or None (moved on a later start)."""
    old = os.open(link, os.O_RDWR | os.O_CLOEXEC)
    try:
        if not _lock_alone(old):
            log.info("index %s is open elsewhere: its lock file moves on a later start", link)
            return None
        _point(link, target)
        os.ftruncate(old, 0)  # a process that opened it meanwhile finds nothing to share
    finally:
        os.close(old)
    return _open_filled(link.parent, target, readonly=False)


def _point(link: Path, target: Path) -> None:
    temp = link.with_name(f".{LOCK_NAME}.{os.getpid()}")
    temp.unlink(missing_ok=True)
    os.symlink(target, temp)
    os.replace(temp, link)


def _open_filled(index: Path, target: Path, *, readonly: bool) -> int:
    """Open (or make) ``target``; when no process has it open, write it in full. A reader
    that finds it missing or unused while the daemon runs waits up to ``_DAEMON_WAIT`` (the
    daemon takes its lock before it opens the index, and keeps it a moment after closing);
    still so, it is not looking at the daemon's file (another /run: a container, a removed
    directory) and refuses."""
    deadline = time.monotonic() + _DAEMON_WAIT
    while True:
        daemon = readonly and _daemon_runs(index)
        fd = _open_target(target, create=not daemon)
        if fd is not None:
            try:
                if not _lock_alone(fd):  # in use: whoever opened it first filled it
                    return fd
                if not daemon:
                    _fill(fd)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    raise LockElsewhere(
        f"cannot open cache index {index}: its fetcher daemon runs but this process does not "
        f"see it using the lock file {target} (another /run, as in a container): open the "
        "index where the daemon runs"
    )


_DAEMON_WAIT: Final = 5.0


def _open_target(target: Path, *, create: bool) -> int | None:
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    try:
        return os.open(target, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None


def _fill(fd: int) -> None:
    """Write the lock file in full (this process holds LMDB's exclusive lock; LMDB, opened
    next in this process, takes it over, so nobody sees the file between the fill and LMDB's
    set-up)."""
    st = os.fstat(fd)
    if st.st_size < LOCK_SIZE or st.st_blocks * 512 < st.st_size:
        zeros = bytes(LOCK_SIZE)
        done = 0
        while done < LOCK_SIZE:
            done += os.pwrite(fd, zeros[done:], done)


def forget_lock(index: Path) -> None:
    """Remove the lock file of an index about to be deleted with its cache (nothing else
    removes it; a reboot does, where /run is a tmpfs)."""
    with contextlib.suppress(OSError):
        target = Path(os.readlink(index / LOCK_NAME))
        if target.parent == LOCK_DIR:
            target.unlink()
