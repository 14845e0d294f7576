"""Profiles in the CAS: a profile is a blob named by the ref ``profiles/<name>``, so every
host sees it. Saving a run reads the current profile, adds the trace and writes it back
(compare-and-swap on the ref, retried). ``profile_blobs`` says what a profile references,
for the store GC."""

from __future__ import annotations

import random
from typing import Final

import trio

from lazycaf.cas.api import CAS
from lazycaf.cas.refs import profile_ref
from lazycaf.core.digest import Digest
from lazycaf.core.errors import RefMoved, RefNotFound
from lazycaf.traces.trace import Profile, Trace

__all__ = ["add_run", "load_profile", "profile_blobs"]

_SAVE_ATTEMPTS: Final = 20


def profile_blobs(data: bytes, what: str = "profile") -> set[Digest]:
    """The digests a profile blob references: those its traces recorded for the files they
    read (what the store GC keeps for a profile). ``IntegrityError`` if it is no profile."""
    profile = Profile.decode(data, what=what)
    return {
        Digest.parse(r.digest)
        for run in profile.runs
        for r in run.records
        if Digest.is_hex(r.digest)
    }


async def load_profile(cas: CAS, name: str) -> Profile | None:
    return (await _load(cas, name))[1]


async def _load(cas: CAS, name: str) -> tuple[Digest | None, Profile | None]:
    try:
        digest = await cas.get_ref(profile_ref(name))
    except RefNotFound:
        return None, None
    data = await cas.get(digest)
    return digest, Profile.decode(data, what=f"profile {name!r} ({digest})")


async def add_run(cas: CAS, name: str, trace: Trace) -> tuple[Digest, int]:
    """Merge ``trace`` into profile ``name``; returns the new profile digest and run count.

    Many hosts save runs of one executable at once (a job's hosts all unmount at its end):
    the ref is moved by compare-and-swap, and a save that lost the race re-reads the
    profile and merges again, so no run is lost."""
    for attempt in range(_SAVE_ATTEMPTS):
        current, profile = await _load(cas, name)
        profile = profile or Profile(name)
        profile.add(trace)
        data = profile.encode()
        digest = Digest.of(data)
        await cas.put(digest, data)
        try:
            await cas.set_ref(profile_ref(name), digest, expected=current)
        except RefMoved:
            if attempt == _SAVE_ATTEMPTS - 1:
                raise
            await trio.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
            continue
        return digest, len(profile.runs)
    raise AssertionError("unreachable")
