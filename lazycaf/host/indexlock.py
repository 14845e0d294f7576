"""Where the host index's LMDB lock file lives: in memory, never on the cache disk.

Every process that opens the index (the daemon writes; mounts and ``cache status`` read)
writes to LMDB's lock file (``<index>/lock.mdb``: the writer's mutex and a slot a reader)
through a shared mapping. A write to a mapped page the kernel has written back is a page
fault the filesystem must find space for: Btrfs copies the page, and LMDB makes the file
sparse, so on a full cache disk the fault ends in SIGBUS and the process dies on the spot, no
exception, no log line (a mount and its daemon died so while the cache disk was full).
A tmpfs page is never written back: the lock file lives in ``/dev/shm/lazycaf-<uid>/`` (the
user's own directory: created 0700, refused when it is anything else, since /dev/shm is
world-writable) and ``lock.mdb`` is a symlink to it, which LMDB follows.

``prepare_lock`` (the writer, before LMDB opens the environment) makes or re-points the
link. It replaces a regular lock file (a cache made before this) only while no other process
has the environment open (LMDB's own exclusive lock, byte 0 of the file); a process that
opened the old file meanwhile finds it emptied and fails its open instead of locking apart
from the others. Readers only follow the link: when its target is gone (a reboot empties
/dev/shm) the writer makes it again, never a reader, which might see another /dev/shm (a
container's) and lock apart from the daemon (``missing_lock_reason`` says so). Without a
usable /dev/shm the lock file stays in the index directory, as LMDB makes it.

Root only: systemd-logind (``RemoveIPC=yes``, its default) deletes a regular user's files in
/dev/shm when the user's last session ends, and a lock file deleted under a running daemon
would let the next process lock apart from it. Root, whom ``RemoveIPC`` never touches, runs
the fetcher service and the mounts of a fleet; another user's cache keeps its lock file on
the cache disk (where a full disk can still kill its processes).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from pathlib import Path
from typing import Final

__all__ = ["LOCK_NAME", "forget_lock", "lock_target", "missing_lock_reason", "prepare_lock"]

log = logging.getLogger(__name__)

LOCK_NAME: Final = "lock.mdb"
SHM: Final = Path("/dev/shm")


def _private_dir() -> Path | None:
    """``/dev/shm/lazycaf-<uid>``, made if missing; None for a user other than root (see the
    module's docstring), when it is not this user's own directory (someone else made it
    first), or when /dev/shm is missing."""
    if os.geteuid() != 0:
        return None
    path = SHM / f"lazycaf-{os.geteuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("no private directory in %s (%s): the index lock stays on disk", SHM, exc)
        return None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        log.warning("%s is not this user's own 0700 directory: the index lock stays on disk", path)
        return None
    return path


def lock_target(index: Path, private: Path) -> Path:
    """The lock file for the index directory ``index``: named by its device and inode, so
    each index has its own and a recreated cache may reuse a stale one (a lock file holds no
    data: LMDB resets it when it opens the environment first)."""
    st = os.stat(index)
    return private / f"index-{st.st_dev:x}-{st.st_ino:x}.lock"


def prepare_lock(index: Path) -> None:
    """Point ``<index>/lock.mdb`` at a tmpfs file (see the module's docstring)."""
    private = _private_dir()
    if private is None:
        return
    link = index / LOCK_NAME
    target = lock_target(index, private)
    with contextlib.suppress(OSError):
        if os.readlink(link) == str(target):
            return  # the link is right; LMDB creates its target when a reboot removed it
    try:
        old = os.open(link, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # a new index, or a link whose target is gone: nobody uses it
        old = None
    try:
        if old is not None:
            try:  # LMDB's exclusive lock: whoever holds it is the only user of the file
                fcntl.lockf(old, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
            except OSError:
                log.info("index %s is open elsewhere: its lock file moves on a later start", index)
                return
        temp = index / f".{LOCK_NAME}.{os.getpid()}"
        temp.unlink(missing_ok=True)
        os.symlink(target, temp)
        os.replace(temp, link)
        if old is not None:  # whoever opened the old file meanwhile must not use it
            os.ftruncate(old, 0)
    finally:
        if old is not None:
            os.close(old)


def missing_lock_reason(index: Path) -> str | None:
    """Why a reader cannot open the index, when its lock file link points nowhere."""
    link = index / LOCK_NAME
    try:
        target = os.readlink(link)
    except OSError:
        return None
    if os.path.exists(target):
        return None
    return (
        f"its lock file {target} is gone (a reboot empties {SHM}); the fetcher daemon makes it "
        "again: start it first (a mount does). A process with another /dev/shm (a container's) "
        "cannot share this cache"
    )


def forget_lock(index: Path) -> None:
    """Remove the tmpfs lock file of an index about to be deleted with its cache (nothing
    else removes it; a reboot would)."""
    with contextlib.suppress(OSError):
        target = Path(os.readlink(index / LOCK_NAME))
        if target.parent == SHM / f"lazycaf-{os.geteuid()}":
            target.unlink()
