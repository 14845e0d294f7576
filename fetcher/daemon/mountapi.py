"""The daemon's API for mounts on its Unix socket (the line protocol of ``lazycaf.host.wire``).

    ensure <hex> demand|prefetch  -> ok {"size": n} once the blob is in the cache
    ensure_many <hex> [<hex> ...] -> ok {"missing": null | "<hex>"} once every blob is in the
                                     cache, fetched with one request per source (pin,
                                     materialize); or the first one no source has
    prefetch <hex> [<hex> ...]    -> ok {"queued": n}  (fetched in order, below reads)
    prefetch_bundle {"parts": [[<part hex>, [<hex>, ...]], ...]}
                                  -> ok {"queued": n}  (the same, with one request a part
                                     of a bundle, ``lazycaf.cas.bundle``: these of its blobs)
    touch <hex> [<hex> ...]       -> ok {"touched": n}  (a mount read these cached blobs)
    record <name> <trace json>    -> ok {"profile": hex, "runs": n}  (merged into the profile)
    bundle <name> <executable hex> <hex> [<hex> ...]
                                  -> ok {"bundle": hex | null, "parts": n, "blobs": n,
                                     "bytes": n, "built": bool}  (the profile names a bundle of this
                                     prefetch plan: ``lazycaf.traces.profiles.refresh_bundle``)
    crowd                         -> ok {"files": [CrowdFile row, ...], "profiles": n}  (every
                                     profile's hot set by file digest: ``fetcher.daemon.crowd``)
    resolve <ref> [cached]        -> ok "<hex>"  (the manifest digest a ref names; ``cached``:
                                     the one it last resolved to here, without the CAS)
    mounted <hex>                 -> ok null  (an executable was mounted: remember it)
    holds <hex>                   -> ok {"blobs", "bytes", "missing_blobs", "missing_bytes"}
                                     (how much of an executable the cache holds)
    pin <hex> | unpin <hex>       -> ok {"pins": n}  (keep an executable's blobs out of GC)
    gc                            -> ok {GcResult}  (one GC pass now)
    verify [<bytes per second>]   -> ok {Scrubbed.to_json()}  (rehash every cached blob at
                                     most that fast, 0 or none: no limit; drop the bad;
                                     one scrub at a time)
    stats                         -> ok {FetchService.statistics(), GC's, peers'}
                                     (``fetcher.daemon.metrics.daemon_stats``)
    info                          -> ok {"cache", "cas", "pid", "peer_address", "peers"}

Each connection is served by its own task; a failing request answers ``err`` and the
connection goes on. The digests a connection queued for prefetch are that mount's hot set
until the connection closes (a mount keeps its pooled connections until it exits): GC
evicts them after cold blobs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from dataclasses import asdict
from typing import Any

import trio

from fetcher.cache.collector import GarbageCollector
from fetcher.cache.scrub import scrub
from fetcher.daemon.crowd import CrowdProfiles
from fetcher.daemon.metrics import daemon_stats
from fetcher.fetching.prefetch import PrefetchQueue
from fetcher.fetching.service import FetchService
from fetcher.peers import coverage
from fetcher.peers.peerset import PeerSet
from lazycaf.cas.api import resolve
from lazycaf.core.digest import Digest
from lazycaf.core.errors import LazyCafError, NotFound, RefNotFound, UsageError
from lazycaf.core.manifest import Manifest
from lazycaf.core.priority import Priority
from lazycaf.host.wire import LineReader, error_reply, ok_reply
from lazycaf.traces.profiles import add_run, refresh_bundle
from lazycaf.traces.trace import Trace

__all__ = ["MountApi"]

log = logging.getLogger(__name__)


class _Connection:
    __slots__ = ("hot",)

    def __init__(self) -> None:
        self.hot: set[Digest] = set()


class MountApi:
    def __init__(
        self,
        service: FetchService,
        prefetch: PrefetchQueue,
        gc: GarbageCollector | None = None,
        *,
        peers: PeerSet | None = None,
    ) -> None:
        self.service = service
        self.prefetch = prefetch
        self.crowd = CrowdProfiles(service.cas)
        self.gc = gc
        self.peers = peers
        self._profile_lock = trio.Lock()  # one read-modify-write of a profile at a time
        self._index_limiter = trio.CapacityLimiter(1)  # index writes of this API
        self._scrub_limiter = trio.CapacityLimiter(1)  # one scrub at a time, its own thread
        self._connections: set[_Connection] = set()

    def hot_set(self) -> set[Digest]:
        """The digests live mounts queued for prefetch (their profiles' hot sets)."""
        return set().union(*(c.hot for c in self._connections))

    async def _index(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._index_limiter)

    async def serve(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, [listener])
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        reader = LineReader(stream)
        conn = _Connection()
        self._connections.add(conn)
        try:
            async with stream:
                while (line := await reader.readline()) is not None:
                    try:
                        reply = ok_reply(await self.dispatch(line.decode(), conn))
                    except LazyCafError as exc:
                        reply = error_reply(exc)
                    await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, UnicodeDecodeError):
            pass  # a mount went away mid-exchange
        finally:
            self._connections.discard(conn)

    async def dispatch(self, line: str, conn: _Connection | None = None) -> Any:
        verb, _, rest = line.rstrip("\n").partition(" ")
        if verb in ("touch", "mounted", "holds", "pin", "unpin", "gc", "verify"):
            return await self._dispatch_cache(verb, rest)
        match verb:
            case "ensure":
                hex_digest, _, priority = rest.partition(" ")
                size = await self.service.ensure(
                    Digest.parse(hex_digest), priority=Priority.from_label(priority)
                )
                return {"size": size}
            case "ensure_many":
                missing = await self._ensure_many([Digest.parse(h) for h in rest.split()])
                return {"missing": None if missing is None else missing.hex}
            case "prefetch":
                digests = [Digest.parse(h) for h in rest.split()]
                if conn is not None:
                    conn.hot.update(digests)
                return {"queued": self.prefetch.add(digests)}
            case "prefetch_bundle":
                parts = _bundle_parts(rest)
                if conn is not None:
                    for _, digests in parts:
                        conn.hot.update(digests)
                return {"queued": self.prefetch.add_bundle(parts)}
            case "bundle":
                words = rest.split()
                if len(words) < 2:
                    raise UsageError("bundle wants a profile name, an executable and a plan")
                name, executable, *plan = words
                # not under the profile lock: a build takes seconds, and other mounts' saves
                # must not wait for it (the profile is set by compare-and-swap either way)
                made, built = await refresh_bundle(
                    self.service.cas,
                    name,
                    Digest.parse(executable),
                    [Digest.parse(h) for h in plan],
                )
                if made is None:
                    return {"bundle": None, "parts": 0, "blobs": 0, "bytes": 0, "built": False}
                if built:
                    log.info(
                        "profile %s: bundle %s of %d blobs", name, made.digest, len(made.blobs)
                    )
                return {
                    "bundle": made.digest.hex,
                    "parts": len(made.parts),
                    "blobs": len(made.blobs),
                    "bytes": made.size,
                    "built": built,
                }
            case "record":
                name, _, trace_json = rest.partition(" ")
                try:
                    trace = Trace.from_json(json.loads(trace_json))
                except (ValueError, KeyError, TypeError) as exc:
                    raise UsageError(f"malformed trace: {exc}") from None
                async with self._profile_lock:
                    digest, runs = await add_run(self.service.cas, name, trace)
                log.info("profile %s: %d runs (%s)", name, runs, digest)
                return {"profile": digest.hex, "runs": runs}
            case "resolve":
                return (await self._resolve(*rest.split(" ", 1))).hex
            case "crowd":
                files, profiles = await self.crowd.hot_set()
                return {"files": [f.to_json() for f in files], "profiles": profiles}
            case "stats":
                return daemon_stats(self.service, self.gc, self.peers)
            case "info":
                return {
                    "cache": str(self.service.cache.root),
                    "cas": self.service.cas.where,
                    "pid": os.getpid(),
                    "peer_address": self.peers.self_address if self.peers else None,
                    "peers": self.peers.members() if self.peers else [],
                }
            case _:
                raise UsageError(f"unknown request {line[:100]!r}")

    async def _ensure_many(self, digests: list[Digest]) -> Digest | None:
        """Every blob of ``digests`` in the cache, fetched in bulk below reads
        (``FetchService.fetch_many``); those the bulk fetch did not bring are asked for once
        more, one by one in order, so that an error is that blob's own. The first blob no
        source has is returned; any other error is raised. (Those that landed are not
        looked up again: an index read and a stat a blob were 15 % of a fill's event loop.)"""
        failed = set(await self.service.fetch_many(digests, join=True))
        for d in digests:
            if d not in failed:
                continue
            try:
                await self.service.ensure(d, priority=Priority.PREFETCH)
            except NotFound:
                return d
        return None

    async def _resolve(self, ref: str, mode: str = "") -> Digest:
        index = self.service.cache.index
        if mode == "cached" and not Digest.is_hex(ref):
            found: Digest | None = await self._index(index.cached_ref, ref)
            if found is None:
                raise RefNotFound(
                    ref, "this cache (offline: mount it once online, or use a digest)"
                )
            return found
        digest = await resolve(self.service.cas, ref)
        if not Digest.is_hex(ref) and not ref.startswith("profiles/"):
            await self._index(index.remember_ref, ref, digest)
        return digest

    async def _dispatch_cache(self, verb: str, rest: str) -> Any:
        index = self.service.cache.index
        match verb:
            case "touch":
                digests = [Digest.parse(h) for h in rest.split()]
                self.service.touch(digests)
                return {"touched": len(digests)}
            case "mounted":
                await self._index(index.note_mounted, Digest.parse(rest))
                return None
            case "holds":
                return await self._holds(Digest.parse(rest))
            case "pin" | "unpin":
                digest = Digest.parse(rest)
                if verb == "unpin":
                    current = (await self._index(index.executables)).get(digest)
                    if current is None or current.pins == 0:
                        raise UsageError(f"executable {digest} is not pinned")
                pins = await self._index(index.add_pins, digest, 1 if verb == "pin" else -1)
                if self.gc is not None:
                    self.gc.pins_changed()
                return {"pins": pins}
            case "verify":
                try:
                    rate = int(rest.strip() or 0)
                except ValueError:
                    raise UsageError(f"verify: not a rate in bytes per second: {rest!r}") from None
                return await self._verify(rate)
            case _:  # gc
                if self.gc is None:
                    raise UsageError("this daemon runs without GC")
                return asdict(await self.gc.collect())

    async def _verify(self, rate: int) -> dict[str, object]:
        """Scrub the cache in a worker thread; a mount reading a blob dropped meanwhile
        closes its descriptor within a second and fetches the blob again."""
        if rate < 0:
            raise UsageError(f"verify: a rate must be positive, got {rate}")
        done = await trio.to_thread.run_sync(
            functools.partial(
                scrub,
                self.service.cache,
                rate=rate or None,
                check=trio.from_thread.check_cancelled,
            ),
            limiter=self._scrub_limiter,
        )
        if done.bad:
            log.warning("cache verify dropped %d bad blobs: %s", done.bad, done.to_json())
        return done.to_json()

    async def _holds(self, digest: Digest) -> dict[str, int]:
        cache = self.service.cache
        if not self.service.is_cached(digest):
            raise NotFound(f"manifest {digest} is not in the cache")
        data = await trio.to_thread.run_sync(cache.path(digest).read_bytes)
        manifest = await trio.to_thread.run_sync(Manifest.decode, data)
        held = await trio.to_thread.run_sync(coverage.measure, manifest, cache.has)
        return {
            "blobs": held.blobs,
            "bytes": held.bytes,
            "missing_blobs": held.missing_blobs,
            "missing_bytes": held.missing_bytes,
        }


def _bundle_parts(text: str) -> list[tuple[Digest, list[Digest]]]:
    """The parts of a ``prefetch_bundle`` request: (part digest, the blobs wanted of it)."""
    try:
        parts = json.loads(text)["parts"]
        return [(Digest.parse(part), [Digest.parse(h) for h in blobs]) for part, blobs in parts]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f'prefetch_bundle wants {{"parts": [[hex, [hex, ...]], ...]}}: {exc}'
        ) from None
