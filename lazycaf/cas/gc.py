"""Store GC: delete the blobs no root reaches, once they are older than a grace period.

Roots: every ref and the blob it names; for a ref to a manifest, every blob the manifest lists
(whole files and chunks); for a profile (a ``profiles/...`` ref), what the caller's
``profile_blobs`` finds in it (the digests its traces recorded, its hot-set bundle); and the
``keep`` digests.
A ref that names a missing blob, or a blob that does not decode, keeps its digest and is
reported (``GcReport.problems``); the GC goes on.

The sweep deletes a blob only when no root reaches it AND it was stored before
``start - grace`` (``start``: when the GC began, before it listed anything; the time is the
blob file's mtime, or the object's ``LastModified``, so on S3 the server's clock: the grace
must cover any skew). Blobs are listed *before* the refs are read, so a pack in flight loses
nothing as long as it takes less than the grace: its blobs are younger than the grace whether
or not its ref is set by the time the refs are read.

A pack that reuses a blob already stored (``find_missing`` says present, so it does not
upload it) refreshes the blob's time, so a blob that was garbage (a version removed with
``ref rm`` and packed again more than a grace later) is young again for the GC: the
directory backend sets its mtime on every ``find_missing`` and every write of a blob it
holds; S3, only when ``$LAZYCAF_S3_REFRESH_AFTER`` is set (a refresh moves the blob's
bytes twice, so it is off by default and a reused garbage blob can be lost on S3 while a GC
runs), re-writes an object ``find_missing`` or ``put`` finds whose ``LastModified`` is older
than that threshold. The threshold is why such an S3 GC refuses a grace shorter than
``2 * refresh_after`` (the CAS's ``min_grace``; ``UsageError``, exit 2): a reused blob is at
most ``refresh_after`` old when its pack starts, so with that grace it stays young through a
pack shorter than ``refresh_after``; "grace > threshold" alone would leave the pack no time.
A fixed rule rather than a ``--force``: a shorter grace is only safe if the packs refresh
sooner, so the way down is a lower threshold for both (``$LAZYCAF_S3_REFRESH_AFTER``).

A re-pack whose previous pack's ref still names that pack's manifest neither asks about nor
refreshes the blobs its stat cache knows (``lazycaf.trees.pack``): that manifest is a root
listing them, and the pack checks the ref again just before storing its own manifest (moved
or removed: it asks then, refreshing them).

A refresh may land after the GC listed the blobs, so the sweep lists them again after
marking and deletes only the blobs both listings show older than the cutoff (a dry run
skips the second listing). What stays open: a refresh landing between that second listing
and the blob's deletion (on a directory, its unlink; on S3, its DeleteObjects batch).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import trio

from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, IntegrityError, RefNotFound, UsageError
from lazycaf.core.manifest import Manifest

if TYPE_CHECKING:
    from lazycaf.cas.api import CAS

__all__ = ["GcReport", "RootProblem", "StoredBlob", "collect_garbage", "plan_sweep"]

#: What a profile blob references: ``(data, what) -> digests`` (``lazycaf.traces``).
ProfileBlobs = Callable[[bytes, str], Iterable[Digest]]


class StoredBlob(NamedTuple):
    """A blob as a backend lists it: its size at rest (encoded) and when it was stored."""

    digest: Digest
    size: int
    mtime: float  # seconds since the epoch


@dataclass(frozen=True)
class RootProblem:
    """A ref the GC could not follow; its digest (if any) is kept all the same."""

    ref: str
    digest: Digest | None
    reason: str

    def to_json(self) -> dict[str, object]:
        digest = self.digest.hex if self.digest else None
        return {"ref": self.ref, "digest": digest, "reason": self.reason}


@dataclass
class GcReport:
    """What a GC found and did. ``kept``: reachable blobs; ``young``: unreachable blobs
    younger than the grace (kept too); ``deleted``: what was (or, dry run, would be)
    deleted. Counts and bytes at rest."""

    refs: int = 0
    kept: int = 0
    kept_bytes: int = 0
    young: int = 0
    young_bytes: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    dry_run: bool = False
    grace: float = 0.0
    problems: list[RootProblem] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "refs": self.refs,
            "kept": self.kept,
            "kept_bytes": self.kept_bytes,
            "young": self.young,
            "young_bytes": self.young_bytes,
            "deleted": self.deleted,
            "deleted_bytes": self.deleted_bytes,
            "dry_run": self.dry_run,
            "grace_seconds": self.grace,
            "problems": [p.to_json() for p in self.problems],
        }


def plan_sweep(
    blobs: Iterable[StoredBlob], live: set[Digest], *, cutoff: float
) -> tuple[list[StoredBlob], list[StoredBlob], list[StoredBlob]]:
    """Split ``blobs`` into (reachable, unreachable but stored at or after ``cutoff``,
    unreachable and older: to delete). Pure."""
    kept, young, doomed = [], [], []
    for b in blobs:
        if b.digest in live:
            kept.append(b)
        elif b.mtime >= cutoff:
            young.append(b)
        else:
            doomed.append(b)
    return kept, young, doomed


async def collect_garbage(
    cas: CAS,
    *,
    grace: float,
    keep: Sequence[Digest] = (),
    dry_run: bool = False,
    profile_blobs: ProfileBlobs | None = None,
) -> GcReport:
    """Mark from the roots, sweep what is unreachable and older than ``grace`` seconds
    (module docstring). ``dry_run`` deletes nothing and reports what it would delete."""
    if grace < 0:
        raise UsageError(f"the grace period cannot be negative ({grace:g} s)")
    min_grace = float(getattr(cas, "min_grace", 0.0))
    if grace < min_grace:
        raise UsageError(
            f"a grace of {grace:g} s is too short for {cas.where}: at least {min_grace:g} s"
            " (twice the age at which a pack refreshes a blob it reuses)"
        )
    start = time.time()
    blobs = await cas.list_blobs()  # before the refs: see the module docstring
    report = GcReport(dry_run=dry_run, grace=grace)
    live = set(keep)
    live |= await _mark(cas, report, profile_blobs)
    kept, young, doomed = plan_sweep(blobs, live, cutoff=start - grace)
    if doomed and not dry_run:
        # A pack may have refreshed a blob since the first listing (module docstring).
        doomed, refreshed = await _still_old(cas, doomed, cutoff=start - grace)
        young += refreshed
    report.kept, report.kept_bytes = len(kept), sum(b.size for b in kept)
    report.young, report.young_bytes = len(young), sum(b.size for b in young)
    report.deleted, report.deleted_bytes = len(doomed), sum(b.size for b in doomed)
    if doomed and not dry_run:
        await cas.delete_blobs([b.digest for b in doomed])
    return report


async def _still_old(
    cas: CAS, doomed: list[StoredBlob], *, cutoff: float
) -> tuple[list[StoredBlob], list[StoredBlob]]:
    """Split ``doomed`` by a fresh listing into (still older than ``cutoff``, refreshed
    since); a blob gone meanwhile is dropped from both."""
    now = {b.digest: b for b in await cas.list_blobs()}
    still: list[StoredBlob] = []
    refreshed: list[StoredBlob] = []
    for b in doomed:
        current = now.get(b.digest)
        if current is None:
            continue
        (still if current.mtime < cutoff else refreshed).append(b)
    return still, refreshed


async def _mark(cas: CAS, report: GcReport, profile_blobs: ProfileBlobs | None) -> set[Digest]:
    live: set[Digest] = set()
    for name in await cas.list_refs():
        try:
            digest = await cas.get_ref(name)
        except RefNotFound:  # removed since the listing
            continue
        except (IntegrityError, UsageError) as exc:
            report.problems.append(RootProblem(name, None, f"unreadable ref: {exc}"))
            continue
        report.refs += 1
        live.add(digest)
        try:
            data = await cas.get(digest)
        except BlobNotFound:
            report.problems.append(RootProblem(name, digest, "names a missing blob"))
            continue
        except IntegrityError as exc:
            report.problems.append(RootProblem(name, digest, str(exc)))
            continue
        what = f"blob {digest} (ref {name!r})"
        if name.startswith("profiles/"):
            if profile_blobs is not None:
                fn = functools.partial(_referenced_by_profile, profile_blobs, data, what)
                found, problem = await trio.to_thread.run_sync(fn)
            else:
                found, problem = set(), None
        else:
            fn = functools.partial(_referenced_by_manifest, data, what)
            found, problem = await trio.to_thread.run_sync(fn)
        if problem is not None:
            report.problems.append(RootProblem(name, digest, problem))
        live |= found
    return live


def _referenced_by_manifest(data: bytes, what: str) -> tuple[set[Digest], str | None]:
    try:
        return set(Manifest.decode(data, name=what).blobs()), None
    except IntegrityError as exc:
        return set(), f"not a manifest: {exc}"


def _referenced_by_profile(
    profile_blobs: ProfileBlobs, data: bytes, what: str
) -> tuple[set[Digest], str | None]:
    try:
        return set(profile_blobs(data, what)), None
    except IntegrityError as exc:
        return set(), f"not a profile: {exc}"
