"""The daemon's crowd hot set: every profile in the CAS merged by file digest, for mounts
that have no profile of their own (``lazycaf.traces.crowd``).

One ``GET /v1/refs?prefix=profiles/`` (``CAS.read_refs``) lists the profiles; each profile
blob is fetched and reduced to its hot set once per daemon (kept by digest: a profile that a
run updated is a new blob); the merged hot set is kept ``ttl`` seconds, so the mounts of one
job share one listing. Bounded: at most ``max_profiles`` profiles (the first by name), and
the merge keeps ``MAX_CROWD_FILES`` files. A profile that cannot be read or decoded counts as
empty (logged); a CAS that cannot list refs raises to the asking mount, which then runs
without.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import trio

from lazycaf.cas.api import CAS
from lazycaf.core.digest import Digest
from lazycaf.core.errors import LazyCafError
from lazycaf.traces.crowd import CrowdFile, crowd_hot_set, profile_files
from lazycaf.traces.trace import Profile

__all__ = ["CROWD_TTL", "MAX_PROFILES", "CrowdProfiles"]

log = logging.getLogger(__name__)

CROWD_TTL: Final = 30.0  # seconds a merged crowd hot set is reused
MAX_PROFILES: Final = 1000
_LOADS_IN_FLIGHT: Final = 8


class CrowdProfiles:
    def __init__(
        self,
        cas: CAS,
        *,
        ttl: float = CROWD_TTL,
        max_profiles: int = MAX_PROFILES,
    ) -> None:
        self.cas = cas
        self.ttl = ttl
        self.max_profiles = max_profiles
        self._files: dict[Digest, list[CrowdFile]] = {}  # per profile blob
        self._merged: tuple[float, list[CrowdFile], int] | None = None
        self._lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(_LOADS_IN_FLIGHT)

    async def hot_set(self) -> tuple[list[CrowdFile], int]:
        """The merged hot set of every profile, and how many profiles went into it."""
        async with self._lock:  # concurrent mounts wait for one listing
            if self._merged is not None and time.monotonic() - self._merged[0] < self.ttl:
                return self._merged[1], self._merged[2]
            refs = await self.cas.read_refs("profiles/")
            digests = [refs[name] for name in sorted(refs)][: self.max_profiles]
            async with trio.open_nursery() as nursery:
                for d in set(digests) - self._files.keys():
                    nursery.start_soon(self._load, d)
            self._files = {d: self._files[d] for d in digests if d in self._files}
            merged = await trio.to_thread.run_sync(crowd_hot_set, list(self._files.values()))
            self._merged = (time.monotonic(), merged, len(self._files))
            return merged, len(self._files)

    async def _load(self, digest: Digest) -> None:
        async with self._limiter:
            try:
                data = await self.cas.get(digest)
                files = await trio.to_thread.run_sync(_files_of, data, digest)
            except LazyCafError as exc:
                log.warning("crowd prefetch skips profile %s: %s", digest, exc)
                files = []
            self._files[digest] = files


def _files_of(data: bytes, digest: Digest) -> list[CrowdFile]:
    return profile_files(Profile.decode(data, what=f"profile {digest}"))
