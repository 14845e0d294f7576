"""Btrfs compression: a directory's property (what ``btrfs property set DIR compression``
sets, and what the files created in it inherit), and compression deferred: a directory whose
new files are written without it, and a file compressed after the fact.

A file written into a directory whose ``btrfs.compression`` property is ``none`` inherits the
``NOCOMPRESS`` flag: writeback stores its bytes as they are, where a compressed directory's
files cost the kernel's writeback threads zstd at level 3 (~1 CPU-s for the ~190 MB a cold
`import torch` writes on this machine, in the window the job waits in). ``compress_file``
asks Btrfs to rewrite a file's extents compressed with zstd (``BTRFS_IOC_DEFRAG_RANGE`` with
``BTRFS_DEFRAG_RANGE_COMPRESS``, which applies whatever the file's flags say) and starts the
writeback, after setting the file's own property to zstd for pages not written back yet;
readers keep reading the same bytes throughout. Both need Btrfs; the defrag
needs the file open for writing or ``CAP_SYS_ADMIN``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from pathlib import Path
from typing import Final

__all__ = ["can_compress", "compress_file", "compresses", "set_compression"]

# _IOW(0x94, 16, struct btrfs_ioctl_defrag_range_args): start, len, flags, extent_thresh,
# compress_type, unused[4]
_DEFRAG_RANGE: Final = 0x40309410
_ARGS: Final = struct.Struct("<QQQII16x")
_RANGE_COMPRESS: Final = 1
_RANGE_START_IO: Final = 2
_ZSTD: Final = 3
_PROPERTY: Final = "btrfs.compression"


def set_compression(path: Path, algorithm: str) -> None:
    """Set ``path``'s compression property (``zstd``; ``none``: files created in a directory
    from then on are written uncompressed); ``OSError`` where that cannot be (not Btrfs, no
    permission)."""
    os.setxattr(path, _PROPERTY, algorithm.encode())


def compresses(path: Path) -> bool:
    """Whether Btrfs compresses the files created in ``path`` (its compression property)."""
    try:
        value = os.getxattr(path, _PROPERTY)
    except OSError:
        return False
    return value not in (b"", b"none", b"no")


def can_compress(directory: Path) -> bool:
    """Whether ``compress_file`` works on a read-only file in ``directory`` (it needs
    CAP_SYS_ADMIN or write access): tried on a probe file."""
    probe = directory / f".compress-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
        try:
            os.write(fd, b"probe\n" * 1024)
        finally:
            os.close(fd)
        compress_file(probe)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return True


def compress_file(path: Path) -> None:
    """Rewrite ``path``'s extents compressed with zstd (writeback started, not waited for),
    and have its pages not yet written back compressed when they are (the file's own
    compression property: a defrag sees only the extents already on disk). ``OSError`` as
    the kernel refuses (ENOENT: the file is gone)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.setxattr(fd, _PROPERTY, b"zstd")
        args = _ARGS.pack(0, 2**64 - 1, _RANGE_COMPRESS | _RANGE_START_IO, 0, _ZSTD)
        fcntl.ioctl(fd, _DEFRAG_RANGE, args)
    finally:
        os.close(fd)
