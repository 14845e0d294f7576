"""The FUSE request handlers (the only ``pyfuse3`` importer).

Handlers are thin: metadata comes from the pure ``InodeTable``, bytes from ``BlobReader``.
They raise only ``pyfuse3.FUSEError``; ``errno_for`` maps the project's errors in one table,
and ``read`` answers EIO for any failure at all (one log line), so no read ends the mount.
The tree is immutable, so entries and attributes are cached by the kernel for a day, negative
lookups too, and open files keep their page cache. ``LazyOperations.requests`` counts the
requests each handler received (by opcode name); the mount logs them on its way out.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, Final, ParamSpec, TypeVar

import pyfuse3
import trio

from lazycaf.core.errors import IntegrityError, LazyCafError, NotFound, Unavailable
from lazycaf.core.manifest import SYMLINK
from lazycaf.mount.blobreader import BlobReader
from lazycaf.mount.inodes import InodeTable

__all__ = [
    "LazyOperations",
    "can_skip_open",
    "errno_for",
    "fuse_close",
    "fuse_init",
    "fuse_main",
    "fuse_terminate",
]

log = logging.getLogger(__name__)
TIMEOUT: Final = 86400.0
P = ParamSpec("P")
R = TypeVar("R")

_ERRNO: Final[list[tuple[type[BaseException], int]]] = [
    (NotFound, errno.ENOENT),
    (KeyError, errno.ENOENT),
    (IntegrityError, errno.EIO),
    (Unavailable, errno.EIO),
    (LazyCafError, errno.EIO),
    (OSError, errno.EIO),
]


def errno_for(exc: BaseException) -> int:
    for kind, code in _ERRNO:
        if isinstance(exc, kind):
            return code
    return errno.EIO


def _fuse_errors(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn any exception of a handler into a FUSEError, so no request takes the mount down."""

    @wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = errno_for(exc)
            if code == errno.EIO:
                log.error("%s failed: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(code) from exc

    return wrapper


def _one_line(exc: BaseException) -> str:
    """An error as one log line: project errors by their message, anything else with its
    type (the first leaf of an exception group)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    text = " ".join(str(exc).split())
    return text if isinstance(exc, LazyCafError) else f"{type(exc).__name__}: {text}"


def can_skip_open() -> bool:
    """Whether pyfuse3 carries the LazyCAF patch (patches/): with it, ``open``/``opendir``
    can answer ENOSYS, after which the kernel sends no open/release/opendir/releasedir at all,
    keeps page caches and caches directory listings, and ``read``/``readdir`` receive the
    inode in place of the (then zero) file handle. Stock pyfuse3 passes only the handle."""
    return bool(getattr(pyfuse3, "LAZYCAF_FH_IS_INODE", False))


class LazyOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, table: InodeTable, reader: BlobReader, *, skip_open: bool) -> None:
        super().__init__()
        self.table = table
        self.reader = reader
        self.skip_open = skip_open
        self._uid, self._gid = os.getuid(), os.getgid()
        self.on_first_open: Callable[[int], None] | None = None
        self._file_bytes: int | None = None
        self.requests: Counter[str] = Counter()  # requests received, by opcode name
        # set once the kernel's INIT request is answered (then its settings are applied)
        self.initialized = trio.Event()

    def init(self) -> None:
        """The INIT request: called before libfuse answers it, on the trio thread, so a
        task woken here runs once the answer (and what the kernel does with it) is done."""
        self.initialized.set()

    def attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        """Made per request from the index (no cache: the kernel keeps attributes for a
        day, and a cache here would grow with the tree)."""
        st_mode, size, mtime_ns = self.table.stat(inode)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = st_mode
        a.st_nlink = self.table.nlink(inode)
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = -(-size // 512)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    async def forget(self, inode_list: Any) -> None:
        self.requests["forget"] += 1  # nothing to forget: inodes are the index's rows
        return None

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        self.requests["lookup"] += 1
        inode = self.table.lookup(parent_inode, name)
        if inode is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0  # a cached negative entry
            negative.entry_timeout = TIMEOUT
            return negative
        return self.attributes(inode)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        self.requests["getattr"] += 1
        return self.attributes(inode)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        self.requests["readlink"] += 1
        e = self.table.entry(inode)
        if e.kind != SYMLINK or e.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return e.target.encode()

    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        self.requests["opendir"] += 1
        if self.skip_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops asking: see skip_open
        if not self.table.is_dir(inode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        self.requests["readdir"] += 1
        table = self.table
        for i in range(start_id, table.child_count(fh)):
            name, inode = table.child(fh, i)
            if not pyfuse3.readdir_reply(token, name, self.attributes(inode), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self.requests["releasedir"] += 1
        return None

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        self.requests["open"] += 1
        if self.skip_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if not stat.S_ISREG(self.table.st_mode(inode)):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.on_first_open is not None:
            self.on_first_open(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.requests["read"] += 1
        try:
            entry = self.table.entry(fh)
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        try:
            data = await self.reader.read(fh, entry, off, size)
        except Exception as exc:
            # Whatever failed (a fetch, a blob of the wrong size, the disk, or a bug), the
            # read gets EIO and the mount goes on: an exception escaping a handler ends
            # pyfuse3's main loop and so the mount. EIO also for "not found": the file
            # exists, its bytes could not be had. One line naming the file (and the blob).
            log.error(
                "read of %s (%d bytes at %d) failed: %s",
                entry.path,
                size,
                off,
                _one_line(exc),
            )
            raise pyfuse3.FUSEError(errno.EIO) from exc
        return data  # type: ignore[return-value]  # pyfuse3 takes any buffer

    async def release(self, fh: int) -> None:
        self.requests["release"] += 1
        return None

    @_fuse_errors
    async def statfs(self, ctx: Any) -> Any:
        self.requests["statfs"] += 1
        s = pyfuse3.StatvfsData()
        if self._file_bytes is None:
            self._file_bytes = self.table.index.file_bytes()
        total = self._file_bytes
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = -(-total // 4096)
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.table)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        self.requests["getxattr"] += 1
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        self.requests["listxattr"] += 1
        return []

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        self.requests["access"] += 1
        return not mode & os.W_OK


def fuse_init(ops: LazyOperations, mountpoint: str, options: set[str]) -> None:
    pyfuse3.init(ops, mountpoint, options)


async def fuse_main() -> None:
    await pyfuse3.main()


def fuse_terminate() -> None:
    pyfuse3.terminate()


def fuse_close(*, unmount: bool) -> None:
    pyfuse3.close(unmount=unmount)
