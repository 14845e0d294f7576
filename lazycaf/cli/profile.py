"""The CLI's ``lazycaf profile`` commands: show a profile, save a mount's run.

``profile record`` is ``lazycaf run --record`` (``lazycaf.cli.run``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
from typing import Any, Final

import trio

from lazycaf.cas.api import load_manifest, open_cas
from lazycaf.core.errors import NotFound, UsageError
from lazycaf.core.manifest import DIR, FILE, Manifest
from lazycaf.mount.root import mount_pid
from lazycaf.traces.profiles import load_profile
from lazycaf.traces.trace import SOURCES, Profile, plan_prefetch

__all__ = ["describe", "save", "show", "summarize"]

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
    if args.json:
        print(json.dumps(summarize(profile, manifest, top=args.top), sort_keys=True))
        return 0
    for line in describe(profile, manifest, top=args.top):
        print(line)
    return 0


def summarize(profile: Profile, manifest: Manifest, *, top: int = 15) -> dict[str, Any]:
    """The figures of ``profile show`` (pure): ``profile show --json`` prints them, and
    ``describe`` words them. Lists of files are cut to ``top``, their counts are not."""
    hot = profile.hot_set()
    by_path = manifest.by_path
    sizes = manifest.blobs()
    hot_files = [h for h in hot if h.path in by_path]
    touched = {h.path for h in hot}
    natives = sorted(
        (
            (e.size, e.path)
            for e in manifest
            if e.kind == FILE and _NATIVE.search(e.path) and e.path not in touched
        ),
        reverse=True,
    )
    newest = profile.runs[-1]
    return {
        "profile": profile.name,
        "runs": len(profile.runs),
        "executable": newest.executable,
        "files": sum(e.kind == FILE for e in manifest),
        "bytes": manifest.total_bytes(),
        "hot_files": len(hot_files),
        "hot_bytes": sum(by_path[h.path].size for h in hot_files),
        "prefetch_bytes": sum(sizes[d] for d in plan_prefetch(hot, by_path, manifest.chunk_size)),
        "bytes_read": sum(h.bytes_read for h in hot_files),
        "wait_seconds": [round(r.wait_seconds(), 6) for r in profile.runs],
        "first_reads": {s: sum(r.source == s for r in newest.records) for s in SOURCES},
        "bundle": None
        if profile.bundle is None
        else {
            "digest": profile.bundle.digest.hex,
            "parts": len(profile.bundle.parts),
            "blobs": len(profile.bundle.blobs),
            "bytes": profile.bundle.size,
            "executable": profile.bundle_for,
        },
        "hot": [
            {"path": h.path, "t": h.t, "share": h.share, "bytes_read": h.bytes_read}
            for h in hot_files[:top]
        ],
        "untouched_packages": [
            {"path": path, "bytes": size} for path, size in _untouched_packages(manifest, touched)
        ],
        "untouched_native": len(natives),
        "untouched_native_bytes": sum(size for size, _ in natives),
        "largest_untouched_native": [{"path": path, "bytes": size} for size, path in natives[:top]],
    }


def describe(profile: Profile, manifest: Manifest, *, top: int = 15) -> list[str]:
    """The read-out of ``profile show`` (pure)."""
    f = summarize(profile, manifest, top=top)
    out = [
        f"profile {f['profile']!r}: {f['runs']} run(s), newest of executable "
        f"{f['executable'][:12]}",
        f"hot set: {f['hot_files']} of {f['files']} files; "
        f"{f['hot_bytes'] / MB:.1f} MB of {f['bytes'] / MB:.1f} MB in those files "
        f"({100 * f['hot_bytes'] / max(f['bytes'], 1):.0f}%), "
        f"{f['prefetch_bytes'] / MB:.1f} MB to prefetch, {f['bytes_read'] / MB:.1f} MB read",
        "blocked on fetches: "
        + ", ".join(f"{w:.2f} s" for w in f["wait_seconds"])
        + " (oldest to newest run)",
        "newest run, first reads served from: "
        + ", ".join(f"{source} {n}" for source, n in f["first_reads"].items()),
        "hot-set bundle: "
        + (
            "none (the next saved run builds one)"
            if (b := f["bundle"]) is None
            else f"{b['blobs']} blobs, {b['bytes'] / MB:.1f} MB in {b['parts']} parts "
            f"({b['digest'][:12]}), planned on executable {b['executable'][:12]}"
        ),
        f"first {len(f['hot'])} hot files (typical first access, share of runs):",
    ]
    out += [f"  {h['t']:8.3f} s  {h['share']:4.0%}  {h['path']}" for h in f["hot"]]
    out.append(f"packages no run touched ({len(f['untouched_packages'])}):")
    out += [f"  {p['bytes'] / MB:8.1f} MB  {p['path']}" for p in f["untouched_packages"]]
    out.append(
        f"native libraries no run touched ({f['untouched_native']}, "
        f"{f['untouched_native_bytes'] / MB:.1f} MB); largest:"
    )
    out += [f"  {n['bytes'] / MB:8.1f} MB  {n['path']}" for n in f["largest_untouched_native"]]
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
