"""Profiles in the CAS: a profile is a blob named by the ref ``profiles/<name>``, so every
host sees it. Saving a run reads the current profile, adds the trace and writes it back
(compare-and-swap on the ref, retried). ``profile_blobs`` says what a profile references,
for the store GC.

A profile may name a *bundle* (``lazycaf.cas.bundle``): its prefetch plan stored as one blob,
so a cold start fetches the hot set with one request. ``refresh_bundle`` builds one when a
run is saved and the profile has none that still fits the plan (``bundle_fits``: not
another executable's, nor one whose blobs the plan has mostly left or outgrown)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from lazycaf.cas.api import CAS
from lazycaf.cas.bundle import (
    MAX_BUNDLE_BLOBS,
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_DECODED,
    Bundle,
    make_bundle,
)
from lazycaf.cas.refs import profile_ref
from lazycaf.core.digest import Digest
from lazycaf.core.errors import RefMoved, RefNotFound
from lazycaf.traces.trace import Profile, Trace

__all__ = ["add_run", "bundle_fits", "load_profile", "profile_blobs", "refresh_bundle"]

_SAVE_ATTEMPTS: Final = 20
_BUNDLE_FITS: Final = 0.9


def profile_blobs(data: bytes, what: str = "profile") -> set[Digest]:
    """The digests a profile blob references: those its traces recorded for the files they
    read (what the store GC keeps for a profile). ``IntegrityError`` if it is no profile."""
    profile = Profile.decode(data, what=what)
    out = {
        Digest.parse(r.digest)
        for run in profile.runs
        for r in run.records
        if Digest.is_hex(r.digest)
    }
    if profile.bundle is not None:
        out.update(p.digest for p in profile.bundle.parts)
    return out


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

    async def merge(profile: Profile | None) -> Profile:
        profile = profile or Profile(name)
        profile.add(trace)
        return profile

    digest, profile = await _rewrite(cas, name, merge)
    return digest, len(profile.runs)


async def _rewrite(
    cas: CAS, name: str, change: Callable[[Profile | None], Awaitable[Profile | None]]
) -> tuple[Digest, Profile]:
    """Store ``change`` of profile ``name`` (None: it has none yet) and move its ref by
    compare-and-swap; a change that lost the race is made again on the profile that won.
    ``_NoChange`` when ``change`` returns None (there is nothing to write)."""
    for attempt in range(_SAVE_ATTEMPTS):
        current, profile = await _load(cas, name)
        changed = await change(profile)
        if changed is None:
            raise _NoChange
        data = changed.encode()
        digest = Digest.of(data)
        await cas.put(digest, data)
        try:
            await cas.set_ref(profile_ref(name), digest, expected=current)
        except RefMoved:
            if attempt == _SAVE_ATTEMPTS - 1:
                raise
            await trio.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
            continue
        return digest, changed
    raise AssertionError("unreachable")


class _NoChange(Exception):
    """``_rewrite``'s change found nothing to write."""


def bundle_fits(profile: Profile, executable: Digest, plan: list[Digest]) -> bool:
    """Whether the profile's bundle still serves ``plan`` on ``executable``: built for it,
    at least ``_BUNDLE_FITS`` of its blobs among as many first blobs of the plan, and the
    plan not much longer than the bundle (unless the bundle is as large as one may be)."""
    bundle = profile.bundle
    if bundle is None or profile.bundle_for != executable.hex or not bundle.blobs:
        return False
    n = len(bundle.blobs)
    if len(set(plan[:n]).intersection(bundle.blobs)) < _BUNDLE_FITS * n:
        return False
    full = (
        n >= MAX_BUNDLE_BLOBS
        or bundle.stored >= _BUNDLE_FITS * MAX_BUNDLE_BYTES
        or bundle.decoded >= _BUNDLE_FITS * MAX_BUNDLE_DECODED
    )
    return full or len(plan) * _BUNDLE_FITS <= n


async def refresh_bundle(
    cas: CAS, name: str, executable: Digest, plan: list[Digest]
) -> tuple[Bundle | None, bool]:
    """Make sure profile ``name`` names a bundle that fits ``plan`` (the prefetch plan of
    its hot set on ``executable``): build and store one if it does not. Returns the bundle
    (None: no profile, or nothing to bundle) and whether this call built it."""
    built: Bundle | None = None
    kept: Bundle | None = None

    async def attach(profile: Profile | None) -> Profile | None:
        nonlocal built, kept
        if profile is None or not plan:
            return None
        if bundle_fits(profile, executable, plan):  # another host's save did it meanwhile
            kept = profile.bundle
            return None
        built = built or await make_bundle(cas, plan)
        if not built.blobs:
            return None
        profile.bundle, profile.bundle_for = built, executable.hex
        return profile

    try:
        await _rewrite(cas, name, attach)
    except _NoChange:
        return kept, False
    return built, True
