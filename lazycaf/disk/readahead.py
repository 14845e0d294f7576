"""Read-ahead advice: ask the kernel to start reading a file's bytes into the page cache.

``POSIX_FADV_WILLNEED`` queues the reads and returns, so a caller that will read several
files (or the rest of one) soon gets them in flight at once instead of one blocking read at
a time. It is advice only: a filesystem that refuses it changes nothing, so errors are
ignored here.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["will_need"]


def will_need(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask for ``length`` bytes of ``fd`` from ``offset`` (0: to the end of the file)."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
