"""The CLI's ``lazycaf profile`` commands: show a profile, save a mount's run.

``profile record`` is ``lazycaf run --record`` (``lazycaf.cli.run``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
from typing import Final

import trio

from lazycaf.cas.api import load_manifest, open_cas
from lazycaf.core.errors import NotFound, UsageError
from lazycaf.core.manifest import DIR, FILE, Manifest
from lazycaf.mount.root import mount_pid
from lazycaf.traces.profiles import load_profile
from lazycaf.traces.trace import Profile, plan_prefetch

__all__ = ["save", "show"]

_NATIVE: Final = re.compile(r"\.so(\.[0-9.]+)?$")
_METADATA: Final = (".dist-info", ".egg-info", "__pycache__")
MB: Final = 1e6


async def save(args: argparse.Namespace) -> int:
    pid = await trio.to_thread.run_sync(mount_pid, args.mountpoint)
    if pid is None:
        raise UsageError(f"no lazycaf mount process serves {args.mountpoint}")
    os.kill(pid, signal.SIGUSR1)
    print(f"asked mount process {pid} to save its run into its profile")
    return 0


async def show(args: argparse.Namespace) -> int:
    cas = open_cas(args.cas, cacert=args.cacert)
    try:
        profile = await load_profile(cas, args.name)
        if profile is None:
            raise NotFound(f"no profile {args.name!r} in {cas.where}")
        _, manifest = await load_manifest(cas, profile.runs[-1].executable)
    finally:
        with trio.CancelScope(shield=True):
            await cas.aclose()
    for line in describe(profile, manifest, top=args.top):
        print(line)
    return 0


def describe(profile: Profile, manifest: Manifest, *, top: int = 15) -> list[str]:
    """The read-out of ``profile show`` (pure)."""
    hot = profile.hot_set()
    by_path = manifest.by_path
    sizes = manifest.blobs()
    plan = plan_prefetch(hot, by_path, manifest.chunk_size)
    total = manifest.total_bytes()
    hot_files = [h for h in hot if h.path in by_path]
    file_bytes = sum(by_path[h.path].size for h in hot_files)
    out = [
        f"profile {profile.name!r}: {len(profile.runs)} run(s), newest of executable "
        f"{profile.runs[-1].executable[:12]}",
        f"hot set: {len(hot_files)} of {sum(e.kind == FILE for e in manifest)} files; "
        f"{file_bytes / MB:.1f} MB of {total / MB:.1f} MB in those files "
        f"({100 * file_bytes / max(total, 1):.0f}%), {sum(sizes[d] for d in plan) / MB:.1f} MB "
        f"to prefetch, {sum(h.bytes_read for h in hot_files) / MB:.1f} MB read",
        "blocked on fetches: "
        + ", ".join(f"{r.wait_seconds():.2f} s" for r in profile.runs)
        + " (oldest to newest run)",
        "newest run, first reads served from: "
        + ", ".join(
            f"{source} {sum(r.source == source for r in profile.runs[-1].records)}"
            for source in ("cache", "prefetch", "fetch")
        ),
        f"first {min(top, len(hot_files))} hot files (typical first access, share of runs):",
    ]
    out += [f"  {h.t:8.3f} s  {h.share:4.0%}  {h.path}" for h in hot_files[:top]]
    touched = {h.path for h in hot}
    packages = _untouched_packages(manifest, touched)
    out.append(f"packages no run touched ({len(packages)}):")
    out += [f"  {size / MB:8.1f} MB  {path}" for path, size in packages]
    natives = sorted(
        (
            (e.size, e.path)
            for e in manifest
            if e.kind == FILE and _NATIVE.search(e.path) and e.path not in touched
        ),
        reverse=True,
    )
    out.append(
        f"native libraries no run touched ({len(natives)}, "
        f"{sum(s for s, _ in natives) / MB:.1f} MB); largest:"
    )
    out += [f"  {size / MB:8.1f} MB  {path}" for size, path in natives[:top]]
    return out


def _untouched_packages(manifest: Manifest, touched: set[str]) -> list[tuple[str, int]]:
    """Top-level entries of every site-packages directory that no run read a file of."""
    tops = [
        e.path
        for e in manifest
        if e.path.rpartition("/")[0].endswith("site-packages")
        and not e.path.endswith(_METADATA)
        and (e.kind == DIR or e.path.endswith((".py", ".so")))
    ]
    out = []
    for top in tops:
        prefix = top + "/"
        if top in touched or any(p.startswith(prefix) for p in touched):
            continue
        size = sum(
            e.size
            for e in manifest
            if e.kind == FILE and (e.path == top or e.path.startswith(prefix))
        )
        out.append((top, size))
    return sorted(out, key=lambda item: -item[1])
