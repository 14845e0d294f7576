"""The ``lazycaf cache`` commands: status, gc, verify, pin (init lives with the host commands).

``status`` reads the index read-only (LMDB readers never block the daemon), so it works
with or without a daemon. ``gc`` and ``verify`` ask the running daemon, or, when none runs,
take the daemon's lock and do the work themselves (the index has one writer). ``pin`` goes
through the daemon, starting one like ``mount`` does, since it may have blobs to fetch.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import trio

from lazycaf.cli.host import _absolute, _cache_paths
from lazycaf.cli.progress import Bar, bar_for
from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError, LazyCafError, UsageError
from lazycaf.core.manifest import Manifest
from lazycaf.core.sizes import format_size, parse_size
from lazycaf.host.client import FetcherClient, ensure_daemon, socket_answers
from lazycaf.host.defaults import BULK_TIMEOUT
from lazycaf.host.index import Index
from lazycaf.host.paths import CacheLayout

__all__ = ["gc", "pin", "status", "verify"]

T = TypeVar("T")


def _open_index(cache: Path) -> Index:
    index = CacheLayout(cache).index
    if not index.is_dir():
        raise UsageError(f"no host cache at {cache} (no {index.name})")
    return Index(index, readonly=True)


def _manifest_blobs(cache: Path, digest: Digest) -> dict[Digest, int] | None:
    try:
        data = CacheLayout(cache).blob(digest).read_bytes()
        return Manifest.decode(data).blobs()
    except (OSError, LazyCafError):
        return None


def collect_status(cache: Path) -> dict[str, Any]:
    """Everything ``cache status`` shows (sync)."""
    from fetcher.cache.collector import configured_policy
    from fetcher.cache.diskusage import compression

    index = _open_index(cache)
    try:
        sizes = {d: rec.size for d, rec in index.items()}
        policy, source = configured_policy(index, cache)
        exes = index.executables()
        refs = index.refs()
    finally:
        index.close()
    names: dict[Digest, list[str]] = {}
    for name, d in sorted(refs.items()):
        names.setdefault(d, []).append(name)
    per_exe, pinned, unknown = 0, [], 0
    distinct: set[Digest] = set()
    for exe, rec in sorted(exes.items(), key=lambda kv: kv[0].hex):
        blobs = _manifest_blobs(cache, exe)
        if blobs is None:
            unknown += 1
        cached = {d for d in blobs or () if d in sizes}
        per_exe += sum(sizes[d] for d in cached)
        distinct |= cached
        if rec.pins:
            pinned.append(
                {
                    "digest": exe.hex,
                    "refs": names.get(exe, []),
                    "pins": rec.pins,
                    "bytes": sum((blobs or {}).values()),
                    "cached_bytes": sum(sizes[d] for d in cached),
                }
            )
    usage = sum(sizes.values())
    return {
        "cache": str(cache),
        "usage": usage,
        "budget": policy.budget,
        "budget_source": source,
        "high_watermark": policy.high_bytes,
        "low_watermark": policy.low_bytes,
        "blobs": len(sizes),
        "executables": len(exes),
        "executables_without_manifest": unknown,
        "pinned": pinned,
        "shared_bytes_saved": per_exe - sum(sizes[d] for d in distinct),
        "compression": compression(CacheLayout(cache).blobs).to_json(),
    }


async def status(args: argparse.Namespace) -> int:
    cache, sock = _cache_paths(args)
    info = await trio.to_thread.run_sync(collect_status, cache)
    info["daemon"] = socket_answers(sock)
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    share = info["usage"] / info["budget"] if info["budget"] else 0
    comp = info["compression"]
    if comp["ratio"] is not None:
        comp_text = (
            f"{comp['ratio']:.2f}x ({format_size(comp['uncompressed_bytes'])} in "
            f"{format_size(comp['disk_bytes'])}; {comp['method']})"
        )
    else:
        comp_text = f"unknown ({comp['note'] or comp['method']})"
    lines = [
        f"cache        {info['cache']} (daemon {'running' if info['daemon'] else 'not running'})",
        f"size         {format_size(info['usage'])} of {format_size(info['budget'])} "
        f"({share:.0%}; budget {info['budget_source']}, GC from "
        f"{format_size(info['high_watermark'])} down to {format_size(info['low_watermark'])})",
        f"blobs        {info['blobs']}",
        f"executables  {info['executables']} mounted or pinned here",
        f"sharing      {format_size(info['shared_bytes_saved'])} saved by blobs shared "
        "between executables",
        f"compression  {comp_text}",
        f"pinned       {len(info['pinned'])}",
    ]
    for p in info["pinned"]:
        refs = f" ({', '.join(p['refs'])})" if p["refs"] else ""
        lines.append(
            f"  {p['digest'][:12]}{refs}: {p['pins']} pin(s), "
            f"{format_size(p['cached_bytes'])} of {format_size(p['bytes'])} cached"
        )
    print("\n".join(lines))
    return 0


async def gc(args: argparse.Namespace) -> int:
    from fetcher.daemon.root import DaemonRunning, collect_without_daemon

    cache, sock = _cache_paths(args)
    result: dict[str, Any] | None = None
    with bar_for(args, "cache gc", unit="blobs evicted") as bar:
        if not socket_answers(sock):
            _open_index(cache).close()  # a clear error for a directory that is no cache
            run = functools.partial(
                collect_without_daemon, cache, on_batch=lambda n, of: bar.update(n, total=of)
            )
            try:
                res = await trio.to_thread.run_sync(run)
                result = {"evicted": res.evicted, "bytes_freed": res.bytes_freed}
                result |= {"usage": res.usage, "budget": res.budget, "by": "this process"}
            except DaemonRunning:
                pass  # one started meanwhile: ask it
        if result is None:
            bar.update(label="cache gc: the fetcher daemon is evicting", unit="")
            client = FetcherClient(sock, timeout=600)
            try:
                result = {**await _ticking(bar, client.gc()), "by": "the fetcher daemon"}
            finally:
                await client.aclose()
    print(
        f"evicted {result['evicted']} blobs ({format_size(result['bytes_freed'])}) "
        f"by {result['by']}; cache now {format_size(result['usage'])} of "
        f"{format_size(result['budget'])}"
    )
    return 0


_VERIFY_FLOOR = 50_000_000  # bytes a second assumed of a scrub without a rate, for its bound


def _cache_bytes(cache: Path) -> int:
    index = _open_index(cache)
    try:
        return index.total_bytes()
    finally:
        index.close()


async def verify(args: argparse.Namespace) -> int:
    """Rehash every cached blob (``fetcher.cache.scrub``) and drop the bad: exit 0 when all
    verified, 4 (integrity) when some did not (they are fetched again on their next read)."""
    from fetcher.daemon.root import DaemonRunning, verify_without_daemon

    cache, sock = _cache_paths(args)
    rate = None if args.rate.strip() == "0" else parse_size(args.rate)  # 0: no limit
    total = await trio.to_thread.run_sync(_cache_bytes, cache)  # also: is this a cache?
    result: dict[str, Any] | None = None
    with bar_for(args, "cache verify", total=total, unit="bytes") as bar:
        if not socket_answers(sock):
            run = functools.partial(verify_without_daemon, cache, rate, on_blob=bar.update)
            try:
                res = await trio.to_thread.run_sync(run)
                result = {**res.to_json(), "by": "this process"}
            except DaemonRunning:
                pass  # one started meanwhile: ask it
        if result is None:
            bar.update(0, total=-1, label="cache verify: the fetcher daemon is hashing", unit="")
            bound = 600 + total / (rate or _VERIFY_FLOOR)
            client = FetcherClient(sock, timeout=bound)
            try:
                result = {**await _ticking(bar, client.verify(rate)), "by": "the fetcher daemon"}
            finally:
                await client.aclose()
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(_verify_report(result))
    if result["bad"]:
        looked_at = result["checked"] + len(result["unreadable"]) + len(result["missing"])
        raise IntegrityError(
            f"{result['bad']} of {looked_at} cached blobs did not verify and were dropped; "
            "they are fetched again on their next read"
        )
    return 0


def _verify_report(result: dict[str, Any]) -> str:
    lines = [
        f"checked {result['checked']} blobs ({format_size(result['bytes'])}) by {result['by']}: "
        + (f"{result['bad']} bad, dropped" if result["bad"] else "all verified")
    ]
    for kind in ("corrupt", "unreadable", "missing"):
        lines += [f"  {kind:10s} {hex_digest}" for hex_digest in result[kind]]
    return "\n".join(lines)


async def pin(args: argparse.Namespace) -> int:
    cache, sock = _cache_paths(args)
    cas_spec = args.cas
    if cas_spec and "://" not in cas_spec:
        cas_spec = str(_absolute(cas_spec))
    await trio.to_thread.run_sync(ensure_daemon, cache, cas_spec, sock)
    client = FetcherClient(sock, timeout=BULK_TIMEOUT)
    try:
        digest = await client.resolve(args.ref)
        if args.unpin:
            pins = await client.pin(digest, unpin=True)
            out: dict[str, Any] = {"ref": args.ref, "digest": digest.hex, "pins": pins}
            text = f"unpinned {args.ref} ({digest.short}); {pins} pin(s) left"
            return _report(args, out, text)
        pins = await client.pin(digest)
        try:  # pinned first, so GC keeps what arrives
            with bar_for(args, "cache pin", unit="blobs") as bar:
                nbytes, count, fetched = await _fetch_all(client, cache, digest, bar)
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.pin(digest, unpin=True)
            raise
    finally:
        await client.aclose()
    out = {"ref": args.ref, "digest": digest.hex, "pins": pins, "blobs": count}
    out |= {"bytes": nbytes, "blobs_fetched": fetched}
    text = (
        f"pinned {args.ref} ({digest.short}): {count} blobs, {format_size(nbytes)}; {pins} pin(s)"
    )
    return _report(args, out, text)


def _report(args: argparse.Namespace, out: dict[str, Any], text: str) -> int:
    print(json.dumps(out, sort_keys=True) if args.json else text)
    return 0


async def _fetch_all(
    client: FetcherClient, cache: Path, digest: Digest, bar: Bar
) -> tuple[int, int, int]:
    """Every blob of manifest ``digest`` in the cache: (bytes, blobs, blobs fetched)."""
    await client.ensure(digest)
    blobs = await trio.to_thread.run_sync(_manifest_blobs, cache, digest)
    if blobs is None:
        raise LazyCafError(f"manifest {digest} is unreadable in the cache")
    fetched = 0

    def on_progress(done: int, n_fetched: int) -> None:
        nonlocal fetched
        fetched = n_fetched
        bar.fetched(done, n_fetched)

    bar.update(total=len(blobs))
    await client.ensure_all(list(blobs), cache_root=cache, sizes=blobs, on_progress=on_progress)
    return sum(blobs.values()), len(blobs), fetched


async def _ticking(bar: Bar, work: Awaitable[T]) -> T:
    """Await ``work`` (a request the daemon answers when done) while ``bar`` shows the
    seconds elapsed."""
    async with trio.open_nursery() as nursery:

        async def tick() -> None:
            while True:
                bar.update()
                await trio.sleep(0.1)

        nursery.start_soon(tick)
        result = await work
        nursery.cancel_scope.cancel()
    return result
