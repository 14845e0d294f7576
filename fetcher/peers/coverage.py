"""How much of an executable a host cache holds: all of its blobs, and its profile's hot set.

The answer behind ``holds`` (mounts, offline checks) and ``GET /v1/coverage/{manifest}``
(schedulers placing a job on the warmest host, ``lazycaf affinity``). Sync: the daemon calls
it in a worker thread (it decodes the manifest and checks every blob's file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lazycaf.core.digest import Digest
from lazycaf.core.manifest import Manifest
from lazycaf.traces.trace import Profile, plan_prefetch

__all__ = ["Coverage", "measure"]


@dataclass(frozen=True)
class Coverage:
    blobs: int
    bytes: int
    held_blobs: int
    held_bytes: int
    hot_blobs: int = 0  # the profile's hot set in this tree (0 without a profile)
    hot_bytes: int = 0
    hot_held_blobs: int = 0
    hot_held_bytes: int = 0

    @property
    def missing_blobs(self) -> int:
        return self.blobs - self.held_blobs

    @property
    def missing_bytes(self) -> int:
        return self.bytes - self.held_bytes


def measure(
    manifest: Manifest, has: Callable[[Digest], bool], profile: Profile | None = None
) -> Coverage:
    blobs = manifest.blobs()
    held = {d: n for d, n in blobs.items() if has(d)}
    hot: list[Digest] = []
    if profile is not None:
        hot = plan_prefetch(profile.hot_set(), manifest.by_path, manifest.chunk_size)
    return Coverage(
        blobs=len(blobs),
        bytes=sum(blobs.values()),
        held_blobs=len(held),
        held_bytes=sum(held.values()),
        hot_blobs=len(hot),
        hot_bytes=sum(blobs.get(d, 0) for d in hot),
        hot_held_blobs=sum(1 for d in hot if d in held),
        hot_held_bytes=sum(held.get(d, 0) for d in hot),
    )
