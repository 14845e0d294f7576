"""The kernel's dentry cache warmed with a profile's hot paths, ahead of the run.

A run's first look at a path is a FUSE ``lookup`` per component the kernel has not cached,
each answered by the mount (70-110 us of the mount's CPU; ``import torch`` makes 1,937)
while the process that looks waits. As soon as the mount is up, a worker thread of the mount
``lstat``s the hot set's paths below the mountpoint in profile order: the kernel asks the
mount for each component it lacks (an answer is cached for a day, ``fuse_ops.TIMEOUT``) on
the mount's core while the run computes on its own, and the run's lookups of those paths
then find their answers cached.

Only lookups: reading the files ahead through the mount would have the kernel answer the
run's reads from its page cache, hidden from the run's trace, and the profile would stop
learning what the run reads. ``lstat``, not ``stat``: a symlink's target is a ``readlink``
the kernel does not cache, so following it would not spare the run anything.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

from lazycaf.core.manifest import check_path

__all__ = ["warm_lookups"]


def warm_lookups(mountpoint: str, paths: Iterable[str], stop: threading.Event) -> int:
    """``lstat`` each of ``paths`` (relative to ``mountpoint``; one a manifest could not
    hold, absolute or with a ``..``, is skipped) until ``stop`` is set or the mount goes
    away; returns how many were found. Blocking, and answered by the mount's own
    event loop: call it in a worker thread that the loop never waits for."""
    found = 0
    for path in paths:
        if stop.is_set():
            break
        if check_path(path) is not None:  # a crafted profile's "/etc/x" or "../x": not ours
            continue
        try:
            os.lstat(os.path.join(mountpoint, path))
        except FileNotFoundError:
            continue
        except OSError:  # ENOTCONN: unmounted under us
            break
        found += 1
    return found
