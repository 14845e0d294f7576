"""Profiles in the CAS: a profile is a blob named by the ref ``profiles/<name>``, so every
host sees it. Saving a run reads the current profile, adds the trace and writes it back."""

from __future__ import annotations

from lazycaf.cas import CAS
from lazycaf.digest import Digest
from lazycaf.errors import RefNotFound
from lazycaf.refs import profile_ref
from lazycaf.trace import Profile, Trace

__all__ = ["add_run", "load_profile"]


async def load_profile(cas: CAS, name: str) -> Profile | None:
    try:
        digest = await cas.get_ref(profile_ref(name))
    except RefNotFound:
        return None
    return Profile.decode(await cas.get(digest), what=f"profile {name!r} ({digest})")


async def add_run(cas: CAS, name: str, trace: Trace) -> tuple[Digest, int]:
    """Merge ``trace`` into profile ``name``; returns the new profile digest and run count."""
    profile = await load_profile(cas, name) or Profile(name)
    profile.add(trace)
    data = profile.encode()
    digest = Digest.of(data)
    await cas.put(digest, data)
    await cas.set_ref(profile_ref(name), digest)
    return digest, len(profile.runs)
