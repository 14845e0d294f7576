"""A mount's side of traces and prefetch: load the profile, queue its hot set (without one,
the crowd's: what other executables' runs read of the files this one holds), switch to eager
fetching when a run reads much of the tree, and save the run's trace.

The daemon does the fetching and writes profiles to the CAS; the mount only says what it
expects to read (``prefetch``; through the profile's hot-set bundle when it has one that
fits this tree) and what it read (``record``; then ``bundle``: the daemon has a bundle of
the merged plan built unless the profile's still fits), so a mount never needs CAS
credentials.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Final

import trio

from lazycaf.cas.bundle import MAX_BUNDLE_BLOBS
from lazycaf.core.chunking import chunk_spans
from lazycaf.core.digest import Digest
from lazycaf.core.errors import LazyCafError, NotFound
from lazycaf.core.manifest import FILE, Entry
from lazycaf.core.manifestindex import ManifestIndex
from lazycaf.host.client import FetcherClient
from lazycaf.host.paths import CacheLayout
from lazycaf.mount.importcrawl import ImportCrawler
from lazycaf.mount.lookupwarm import warm_lookups
from lazycaf.traces.crowd import CrowdFile, plan_crowd
from lazycaf.traces.trace import HotFile, Profile, Trace, TraceRecorder, plan_prefetch

__all__ = ["DEFAULT_EAGER_SHARE", "MountProfile", "load_profile", "prefetch_own_bundle"]

_DIR_FILES: Final = 256
_DIR_BYTES: Final = 8 << 20
_SMALL: Final = 256 << 10
_EAGER_WAIT_S: Final = 60.0  # longest the rest waits for the hot set
_BUNDLE_USE: Final = 0.5  # a bundle is used when at least this share of it is in the plan


def _kind(path: str) -> str:
    """What sort of file a name is, for directory prefetch: ``.cpython-311.pyc`` apart from
    ``.cpython-311.opt-1.pyc``, ``.so`` apart from ``.py``."""
    name = path.rpartition("/")[2]
    stem, dot, _ = name.partition(".")
    return name[len(stem) :] if dot else ""


def _small_files_in(index: ManifestIndex, parent: str, kind: str, limit: int) -> list[Entry]:
    """Up to ``limit`` files of directory ``parent`` no larger than ``_SMALL`` whose name is
    of ``kind``, in name order (columns first: an entry is made only for those picked)."""
    at = index.find(parent) if parent else None
    if parent and at is None:
        return []
    out: list[Entry] = []
    for i in index.children_of(at):
        if index.kind(i) != FILE or index.stat(i)[1] > _SMALL:
            continue
        if _kind(index.name(i).decode()) != kind:
            continue
        out.append(index.entry(i))
        if len(out) >= limit:
            break
    return out


log = logging.getLogger(__name__)
DEFAULT_EAGER_SHARE: Final = 0.3


async def load_profile(client: FetcherClient, cache: CacheLayout, name: str) -> Profile | None:
    """Profile ``name`` through the daemon (which fetches it from the CAS); None when there
    is none yet, or it cannot be read (said in the log: the run then records a new one)."""
    try:
        digest = await client.resolve(f"profiles/{name}")
    except NotFound:
        return None
    except LazyCafError as exc:
        log.warning("no prefetch for profile %r: %s", name, exc)
        return None
    try:
        await client.ensure(digest)
        data = await trio.to_thread.run_sync(cache.blob(digest).read_bytes)
        return Profile.decode(data, what=f"profile {name!r} ({digest})")
    except (LazyCafError, OSError) as exc:
        log.warning("no prefetch for profile %r: %s", name, exc)
        return None


async def prefetch_own_bundle(
    client: FetcherClient, profile: Profile | None, executable: Digest
) -> int | None:
    """Ask the daemon for the blobs of the profile's bundle when it was planned on this very
    tree (``Profile.bundle_for``): its blobs are the hot set's plan on this tree (as of
    the save that built it; a later save keeps it only while 90 % of it is still the
    plan's head, ``bundle_fits``), so the request need not wait for the manifest index and
    the plan (80 ms of a cold mount of ``import torch``'s tree, during which the bundle's
    first part now crosses the link). Returns how many blobs were queued; None when not
    asked (no such bundle, or a daemon that refused: the plan then goes as
    ``queue_hot_set`` sends it)."""
    bundle = profile.bundle if profile is not None else None
    if profile is None or bundle is None or profile.bundle_for != executable.hex:
        return None
    parts = [(p.digest, list(p.blobs)) for p in bundle.parts]
    try:
        return await client.prefetch_bundle(parts)
    except LazyCafError as exc:
        log.info("hot set not fetched through its bundle: %s", exc)
        return None


class MountProfile:
    """The mount's ``ReadObserver``: records the run's trace, prefetches what the profile (or,
    without one, a read's directory) says comes next, and turns eager once the run has read
    ``eager_share`` of the tree.

    Invariant: the run's trace is saved at most once (``save``).
    """

    def __init__(
        self,
        client: FetcherClient,
        manifest: ManifestIndex,
        executable: Digest,
        cache: CacheLayout,
        *,
        name: str,
        prefetch: bool = True,
        eager_share: float = DEFAULT_EAGER_SHARE,
        record: bool = True,
        profile: Profile | None = None,
        crowd: bool = True,
        import_graph: bool = True,
        bundle_queued: int | None = None,
        mountpoint: str | None = None,
    ) -> None:
        """``profile``: the one ``load_profile`` found for ``name`` (None: none yet);
        ``crowd``: without one, prefetch what other executables' profiles say is hot;
        ``import_graph``: without one, prefetch what the modules read import
        (``lazycaf.mount.importcrawl``); ``bundle_queued``: the blobs
        ``prefetch_own_bundle`` queued (None: it did not ask for the bundle);
        ``mountpoint``: where the tree is mounted, so the hot set's paths can be looked up
        ahead of the run (``lazycaf.mount.lookupwarm``; None: not)."""
        self.client = client
        self.manifest = manifest
        self.cache = cache
        self.name = name
        self.prefetch = prefetch
        self.eager_share = eager_share
        self.executable = executable
        self.recorder = TraceRecorder(executable.hex)
        self._total = 0  # bytes of the tree's distinct blobs: set by run(), off the ready path
        self._saved = not record  # not recording: nothing to save
        self._nursery: trio.Nursery | None = None
        self._dirs_seen: set[str] = set()
        self.profile = profile
        self.crowd = crowd
        self.crowd_planned = 0  # blobs the crowd hot set queued (no profile of its own)
        self._hot: list[HotFile] = []  # the profile's hot set, computed once (queue_hot_set or run)
        self._plan: list[Digest] = []
        self._queued = 0
        self._bundle_queued = bundle_queued
        self._plan_later = False  # queue_hot_set left the plan to run()
        self.mountpoint = mountpoint
        self.prefetched: set[Digest] = set()  # blobs this mount queued for prefetch
        self._eager_at: int | None = None  # touched bytes that turn the run eager
        self._dir_prefetch = False  # no profile: a miss announces its directory
        self.import_graph = import_graph
        self.crawler: ImportCrawler | None = None  # no profile: set by run()

    # -- ReadObserver ----------------------------------------------------------------------
    def missed(self, entry: Entry) -> None:
        if self._dir_prefetch:
            self._on_miss(entry)

    def read(
        self,
        inode: int,
        entry: Entry,
        blobs: list[Digest],
        chunks: range,
        nbytes: int,
        *,
        fetched: bool,
        wait: float,
    ) -> None:
        recorder = self.recorder
        source, digest = "", ""
        if not recorder.seen(inode):
            if self.crawler is not None:
                self.crawler.read(entry)
            prefetched = any(d in self.prefetched for d in blobs)
            source = "fetch" if fetched else "prefetch" if prefetched else "cache"
            digest = entry.digest.hex if entry.digest else ""
        cs, size = self.manifest.chunk_size, entry.size
        recorder.read(
            inode,
            entry.path,
            digest,
            nbytes,
            source=source,
            wait=wait,
            new_blob_bytes=lambda idx: sum(max(0, min(cs, size - i * cs)) for i in idx),
            chunks=chunks,
        )
        if self._eager_at is not None and recorder.touched_bytes > self._eager_at:
            self._eager_at = None
            self._go_eager()

    async def queue_hot_set(self) -> None:
        """Ask the daemon to prefetch the profile's hot set, in profile order, before the
        mount is ready: the run's first reads come right after. When the profile's own
        bundle was asked for already (``bundle_queued``), the plan's blobs are on their way
        in plan order, and planning the rest (the manifest index's lookups of every hot
        file: 25-35 ms of a cold mount of ``import torch``'s tree) waits for ``run``."""
        if not self.prefetch or self.profile is None:
            return
        bundle = self.profile.bundle
        if self._bundle_queued is not None and bundle is not None:
            self.prefetched.update(bundle.blobs)
            self._queued = self._bundle_queued
            self._plan_later = True
            return
        await self._queue_plan()

    async def _queue_plan(self) -> None:
        """Plan the hot set on this tree and queue what the bundle did not bring."""
        profile = self.profile
        assert profile is not None
        if not self._hot:
            self._hot = await trio.to_thread.run_sync(profile.hot_set)
        hot, per_path, chunk_size = self._hot, self.manifest.by_path, self.manifest.chunk_size
        self._plan = await trio.to_thread.run_sync(plan_prefetch, hot, per_path, chunk_size)
        asked = set(self.prefetched)  # the bundle's blobs, when it went first
        self.prefetched.update(self._plan)
        if self._bundle_queued is None and (parts := self._bundled(self._plan)) is not None:
            try:
                self._queued = await self.client.prefetch_bundle(parts)
                asked.update(d for _, blobs in parts for d in blobs)
            except LazyCafError as exc:  # a daemon that predates bundles: blob by blob
                log.info("hot set not fetched through its bundle: %s", exc)
        # not the bundle's blobs again: the daemon queued them, or warmed them (once)
        rest = [d for d in self._plan if d not in asked]
        try:
            self._queued += await self.client.prefetch(rest)
        except LazyCafError as exc:
            log.warning("no prefetch for profile %r: %s", self.name, exc)

    async def _warm_lookups(self, mountpoint: str) -> None:
        """The hot set's paths into the kernel's dentry cache (``lazycaf.mount.lookupwarm``);
        the thread is left behind when the mount ends (its lookups fail then)."""
        stop = threading.Event()
        paths = [h.path for h in self._hot]
        try:
            found = await trio.to_thread.run_sync(
                warm_lookups, mountpoint, paths, stop, abandon_on_cancel=True
            )
        finally:
            stop.set()
        log.info("hot set's paths looked up ahead of the run: %d", found)

    def _bundled(self, plan: list[Digest]) -> list[tuple[Digest, list[Digest]]] | None:
        """The parts of the profile's bundle to fetch through, each with its blobs in the
        plan, or None: no bundle, or one whose blobs are mostly not in this tree's plan
        (another version's: fetching it would bring more than this run needs)."""
        bundle = self.profile.bundle if self.profile is not None else None
        if bundle is None:
            return None
        planned = set(plan)
        parts = [(p.digest, [d for d in p.blobs if d in planned]) for p in bundle.parts]
        wanted = sum(len(blobs) for _, blobs in parts)
        return parts if wanted >= _BUNDLE_USE * len(bundle.blobs) else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Arm eager mode (and directory prefetch when there is no profile), then stay for
        that work until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if not self.prefetch:
                return
            if self.profile is not None and not self._hot:  # once, for both uses below
                self._hot = await trio.to_thread.run_sync(self.profile.hot_set)
            if self._hot and self.mountpoint is not None:
                nursery.start_soon(self._warm_lookups, self.mountpoint)
            if self._plan_later:
                await self._queue_plan()
            if self.profile is None and self.crowd:
                nursery.start_soon(self._queue_crowd)
            if self.profile is None and self.import_graph:
                self.crawler = ImportCrawler(
                    self.manifest, self.cache, self._prefetch_quietly, self.prefetched
                )
                nursery.start_soon(self.crawler.run)
            self._total = await trio.to_thread.run_sync(self.manifest.blob_bytes)
            if 0 < self.eager_share < 1:
                self._eager_at = int(self._total * self.eager_share)
            if self.profile is None:
                log.info(
                    "no profile %r yet: this run records one; directory prefetch on", self.name
                )
                self._dir_prefetch = True
            else:
                sizes = await trio.to_thread.run_sync(self._hot_blob_sizes)
                hot_bytes = sum(sizes.get(d, 0) for d in self._plan)
                log.info(
                    "profile %r: %d blobs (%d bytes) in the hot set, %d queued for prefetch",
                    self.name,
                    len(self._plan),
                    hot_bytes,
                    self._queued,
                )
                if self._total and hot_bytes > self._total * self.eager_share:
                    # the profile says this run reads much of the tree: fetch the rest too,
                    # but only once the hot set is in, so the two never compete for the link
                    self._go_eager(after=self._plan)
            await trio.sleep_forever()

    async def _queue_crowd(self) -> None:
        """No profile of its own: prefetch the files this executable shares with others, as
        hot as their profiles say (``lazycaf.traces.crowd``), below the run's own reads."""
        try:
            rows, profiles = await self.client.crowd()
        except LazyCafError as exc:
            log.info("no crowd prefetch: %s", exc)
            return
        try:
            plan = await trio.to_thread.run_sync(self._plan_crowd, rows)
        except (ValueError, TypeError) as exc:
            log.warning("no crowd prefetch: the daemon sent a bad hot set (%s)", exc)
            return
        plan = [d for d in plan if d not in self.prefetched]
        self.prefetched.update(plan)
        self.crowd_planned = len(plan)
        try:
            queued = await self.client.prefetch(plan)
        except LazyCafError as exc:
            log.warning("crowd prefetch failed: %s", exc)
            return
        log.info(
            "crowd prefetch: %d blobs from %d profiles' hot sets, %d queued",
            len(plan),
            profiles,
            queued,
        )

    def _plan_crowd(self, rows: list[list[object]]) -> list[Digest]:
        crowd = [CrowdFile.from_json(r) for r in rows]
        files = self.manifest.files_by_digest({bytes.fromhex(f.digest) for f in crowd})
        return plan_crowd(crowd, files, self.manifest.chunk_size)

    def _on_miss(self, entry: Entry) -> None:
        """Without a profile, a file read on demand announces its directory: the import
        system reads a package's modules one after another, so fetch that directory's other
        small files of the same kind in parallel, below the reads (first miss per directory
        only; at most ``_DIR_FILES`` files, ``_DIR_BYTES`` bytes)."""
        parent, _, name = entry.path.rpartition("/")
        if parent in self._dirs_seen or self._nursery is None:
            return
        if name.endswith(".pyc") and self.crawler is not None and self.crawler.working:
            return  # the import graph says which of them come next
        self._dirs_seen.add(parent)
        picked: list[Digest] = []
        total = 0
        for e in _small_files_in(self.manifest, parent, _kind(name), 4 * _DIR_FILES):
            if e.digest is None or e.path == entry.path:
                continue
            if e.digest in self.prefetched or total + e.size > _DIR_BYTES:
                continue
            picked.append(e.digest)
            total += e.size
            if len(picked) >= _DIR_FILES:
                break
        if picked:
            self.prefetched.update(picked)
            self._nursery.start_soon(self._prefetch_quietly, picked)

    async def _prefetch_quietly(self, digests: list[Digest]) -> None:
        try:
            await self.client.prefetch(digests)
        except LazyCafError as exc:
            log.info("directory or import-graph prefetch failed: %s", exc)

    def _go_eager(self, after: list[Digest] | None = None) -> None:
        if self._nursery is None:
            return
        log.info("eager mode: this run reads a large share of the tree; fetching the rest")
        self._nursery.start_soon(self._prefetch_rest, after or [])

    async def _prefetch_rest(self, after: list[Digest]) -> None:
        """Queue every blob not queued yet, once the blobs of ``after`` are cached (or
        ``_EAGER_WAIT_S`` passed: a blob that cannot be fetched must not hold it back)."""
        with trio.move_on_after(_EAGER_WAIT_S):
            pending = after
            while pending:
                pending = await trio.to_thread.run_sync(self._not_cached, pending)
                if pending:
                    await trio.sleep(0.05)
        blobs = await trio.to_thread.run_sync(self.manifest.blobs)
        rest = [d for d in blobs if d not in self.prefetched]
        del blobs
        self.prefetched.update(rest)
        try:
            await self.client.prefetch(rest)
        except LazyCafError as exc:
            log.warning("eager prefetch failed: %s", exc)

    def _hot_blob_sizes(self) -> dict[Digest, int]:
        """The size of each blob of the profile's hot files (the hot set ``queue_hot_set``
        planned: small)."""
        out: dict[Digest, int] = {}
        cs = self.manifest.chunk_size
        for h in self._hot:
            e = self.manifest.get(h.path)
            if e is None or e.digest is None:
                continue
            for d, (_, length) in zip(e.blob_digests(), chunk_spans(e.size, cs), strict=True):
                out[d] = length
        return out

    def _not_cached(self, digests: list[Digest]) -> list[Digest]:
        return [d for d in digests if not os.path.exists(self.cache.blob(d))]

    async def save(self) -> None:
        """Merge this run's trace into the profile (once; later calls do nothing)."""
        if self._saved:
            return
        self._saved = True
        trace = self.recorder.trace()
        if not trace.records:
            return
        body = json.dumps(trace.to_json(), separators=(",", ":"))
        try:
            reply = await self.client.record(self.name, body)
            log.info("saved run to profile %r: %s", self.name, reply)
        except LazyCafError as exc:
            log.warning("could not save the trace to profile %r: %s", self.name, exc)
            return
        # even a mount that did not prefetch: the bundle is for the next runs' cold hosts
        plan = await trio.to_thread.run_sync(self._plan_with, trace)
        try:
            reply = await self.client.bundle(self.name, self.executable, plan)
            log.info("profile %r: hot-set bundle %s", self.name, reply)
        except LazyCafError as exc:
            log.warning("no hot-set bundle for profile %r: %s", self.name, exc)

    def _plan_with(self, trace: Trace) -> list[Digest]:
        """The prefetch plan of the profile with this run merged in, on this tree (what the
        next run's mount plans, unless other hosts saved runs meanwhile)."""
        merged = Profile(self.name, list(self.profile.runs) if self.profile else [])
        merged.add(trace)
        plan = plan_prefetch(merged.hot_set(), self.manifest.by_path, self.manifest.chunk_size)
        return plan[:MAX_BUNDLE_BLOBS]  # a bundle holds no more
