"""Prefetch by the import graph: a run without a profile of its own fetches the modules the
ones it loads will import, before the import system asks for them one at a time.

Each ``.pyc`` the run reads (and each one this crawl prefetched, once it is in the cache) is
read from the cache and sent to the scan worker (``lazycaf.mount.importscan``: the imports
its module-level code runs). Each import is resolved against the tree the way the import
system would find it: relative imports in the module's package, absolute ones on each
*root* seen so far (the directory above a module's outermost package: ``lib/python3.11``,
its ``lib-dynload``, ``site-packages``), every package on the way (``import a.b.c`` runs
``a`` and ``a.b`` too) and every name of a ``from`` list that is a submodule. A module is
its ``.pyc`` in ``__pycache__`` for the interpreter's tag (the tag of the ``.pyc`` files
read), else its source, or an extension module (``name.*.so``). What the tree holds is
prefetched in the order the code imports it, below the run's own reads; new ``.pyc``
files are crawled in turn once they land.

For ``import torch`` this finds 1,019 of the 1,031 modules and extension modules the import
loads among 1,061 files; what it cannot see are the native libraries an extension module
links (the big ones are read in part, on demand, with the mount's readahead).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from importlib.util import MAGIC_NUMBER
from typing import Final

import trio

from lazycaf.core.digest import Digest
from lazycaf.core.errors import LazyCafError
from lazycaf.core.manifest import FILE, Entry
from lazycaf.core.manifestindex import ManifestIndex
from lazycaf.host.paths import CacheLayout
from lazycaf.host.wire import LineReader
from lazycaf.mount.importscan import MAX_PYC

__all__ = ["ImportCrawler"]

log = logging.getLogger(__name__)

_MAX_FILE: Final = 16 << 20  # a larger module file is left to the run's reads (and readahead)
_POLL_S: Final = 0.05  # how often prefetched .pyc files are looked for in the cache
_BATCH: Final = 64  # .pyc files crawled together
_FOREIGN: Final = 8  # another Python's .pyc files read, none of this one's: the crawl stops
_SCAN_TIMEOUT_S: Final = 10.0  # a worker slower than this on one .pyc is stopped
_MAX_CRAWLED: Final = 20_000  # modules crawled at most (a bound for a crafted tree)
_PYCACHE: Final = "/__pycache__/"


class ImportCrawler:
    """Crawls the import graph from the ``.pyc`` files a run reads (see the module).

    ``prefetch`` queues blobs with the daemon; ``claimed`` holds the blobs the mount has
    queued already (shared with the mount's other prefetch, updated here).
    """

    def __init__(
        self,
        manifest: ManifestIndex,
        cache: CacheLayout,
        prefetch: Callable[[list[Digest]], Awaitable[object]],
        claimed: set[Digest],
    ) -> None:
        self.manifest = manifest
        self.cache = cache
        self._prefetch = prefetch
        self._claimed = claimed
        self._known: set[str] = set()  # module files seen: read, or queued by this crawl
        self._waiting: dict[str, Entry] = {}  # prefetched .pyc files not yet crawled
        self._more = trio.Event()  # set when the crawl adds to _waiting
        self._ready_in: trio.MemorySendChannel[Entry]
        self._ready_out: trio.MemoryReceiveChannel[Entry]
        self._ready_in, self._ready_out = trio.open_memory_channel(math.inf)
        self._roots: list[str] = []
        self._tag: str | None = None  # "cpython-311": from the first .pyc read
        self._found: dict[tuple[str, str], Entry | None] = {}
        self._packages: dict[str, tuple[str, str]] = {}  # source dir -> (root, package)
        self._extensions: dict[str, dict[str, str]] = {}  # dir -> module name -> .so name
        self.working = True  # False once the worker failed or cannot read these .pyc files
        self.crawled = 0
        self._foreign = 0  # .pyc files of another Python version read
        self.queued = 0  # blobs this crawl queued

    # -- called by the mount's read path (the FUSE thread: no waiting) ---------------------
    def read(self, entry: Entry) -> None:
        """A file's first read: a ``.pyc`` not crawled yet is crawled (it is cached now),
        unless another prefetch (the crowd's hot set) queued it: then so were its imports."""
        path = entry.path
        if not self.working or not path.endswith(".pyc") or _PYCACHE not in "/" + path:
            return
        if path in self._known:
            if self._waiting.pop(path, None) is not None:  # landed before the poll saw it
                self._ready_in.send_nowait(entry)
            return
        self._known.add(path)
        if entry.digest is not None and all(d in self._claimed for d in entry.blob_digests()):
            return  # the crowd's hot set had it: what it imports came with it
        self._ready_in.send_nowait(entry)

    # -- the crawl -------------------------------------------------------------------------
    async def run(self) -> None:
        """Crawl until cancelled, or until the worker fails (then the mount reads on, as
        without this crawl)."""
        cmd = [sys.executable, "-I", "-m", "lazycaf.mount.importscan"]
        try:
            proc = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        except OSError as exc:
            log.warning("no import-graph prefetch: the scan worker did not start: %s", exc)
            self.working = False
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll_landed)
                nursery.start_soon(self._watch, proc, nursery.cancel_scope)
                try:
                    await self._crawl(proc)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.warning("import-graph prefetch stopped: the scan worker exited")
                except (ValueError, LazyCafError) as exc:  # it answered what it may not
                    log.warning("import-graph prefetch stopped: a bad answer (%s)", exc)
                nursery.cancel_scope.cancel()
        except Exception:  # a best-effort prefetch: never the run's end
            log.exception("import-graph prefetch failed")
        finally:
            self.working = False
            with trio.CancelScope(shield=True):
                proc.kill()
                await proc.wait()
            log.info(
                "import-graph prefetch: %d modules crawled, %d blobs queued",
                self.crawled,
                self.queued,
            )

    @staticmethod
    async def _watch(proc: trio.Process, crawl: trio.CancelScope) -> None:
        status = await proc.wait()
        log.warning("import-graph prefetch stopped: the scan worker exited (%s)", status)
        crawl.cancel()

    async def _crawl(self, proc: trio.Process) -> None:
        """Crawl the ``.pyc`` files ready, in batches (one thread hop, one write to the
        worker and one prefetch request a batch, not a file)."""
        assert proc.stdin is not None and proc.stdout is not None
        lines = LineReader(proc.stdout)
        async for first in self._ready_out:
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._ready_out.receive_nowait())
                except trio.WouldBlock:
                    break
            read = await trio.to_thread.run_sync(self._read_batch, batch)
            if not read:
                continue
            answers: list[tuple[str, list[list[object]]]] = []
            line: bytes | None = b""
            with trio.move_on_after(_SCAN_TIMEOUT_S) as waited:
                await proc.stdin.send_all(
                    b"".join(len(data).to_bytes(4, "little") + data for _, data in read)
                )
                for path, _ in read:
                    line = await lines.readline()
                    if line is None:
                        break
                    found = json.loads(line)
                    if isinstance(found, list):
                        answers.append((path, found))
            if waited.cancelled_caught or line is None:
                how = "stalled" if waited.cancelled_caught else "exited"
                log.warning("import-graph prefetch stopped: the scan worker %s", how)
                return
            self.crawled += len(answers)
            blobs, pycs = await trio.to_thread.run_sync(self._plan_batch, answers)
            if blobs:
                self.queued += len(blobs)
                await self._prefetch(blobs)  # logs its own failure: the crawl goes on
            if pycs:
                self._waiting.update(pycs)
                self._more.set()
            if self.crawled >= _MAX_CRAWLED:
                return
            if not self.crawled and self._foreign >= _FOREIGN:
                log.info("no import-graph prefetch: the .pyc files read are another Python's")
                return

    def _read_batch(self, batch: list[Entry]) -> list[tuple[str, bytes]]:
        """(path, bytes) of each ``.pyc`` of this interpreter's version in ``batch`` whose
        blobs are still cached (an evicted one is not worth a fetch of its own)."""
        out = []
        for entry in batch:
            if entry.size > MAX_PYC:
                continue
            parts = []
            try:
                for d in entry.blob_digests():
                    with open(self.cache.blob(d), "rb") as f:
                        parts.append(f.read())
            except OSError:
                continue
            data = b"".join(parts)
            if len(data) != entry.size:
                continue
            if data[:4] != MAGIC_NUMBER:
                self._foreign += 1
                continue
            out.append((entry.path, data))
        return out

    def _plan_batch(
        self, answers: list[tuple[str, list[list[object]]]]
    ) -> tuple[list[Digest], dict[str, Entry]]:
        blobs: list[Digest] = []
        pycs: dict[str, Entry] = {}
        for path, found in answers:
            more, new = self._plan(path, found)
            blobs += more
            pycs.update(new)
        return blobs, pycs

    async def _poll_landed(self) -> None:
        """Hand each prefetched ``.pyc`` to the crawl once all its blobs are cached."""
        while True:
            if not self._waiting:  # nothing to look for: sleep until the crawl queues more
                self._more = trio.Event()
                await self._more.wait()
            await trio.sleep(_POLL_S)
            landed = await trio.to_thread.run_sync(self._landed, list(self._waiting.values()))
            for entry in landed:
                if self._waiting.pop(entry.path, None) is not None:
                    self._ready_in.send_nowait(entry)

    def _landed(self, entries: list[Entry]) -> list[Entry]:
        exists = os.path.exists
        blob = self.cache.blob
        return [e for e in entries if all(exists(blob(d)) for d in e.blob_digests())]

    # -- resolving imports in the tree (worker threads) -------------------------------------
    def _plan(self, path: str, found: list[list[object]]) -> tuple[list[Digest], dict[str, Entry]]:
        """The blobs to prefetch for the imports ``found`` in ``path``, in import order, and
        the new ``.pyc`` files among them (path -> entry) to crawl once they land."""
        where = self._module_of(path)
        if where is None:
            return [], {}
        root, package = where
        blobs: list[Digest] = []
        pycs: dict[str, Entry] = {}
        for item in found:
            if not (isinstance(item, list) and len(item) == 3):
                continue
            name, fromlist, level = item
            if not isinstance(name, str) or not isinstance(level, int):
                continue
            if not isinstance(fromlist, list):
                continue
            for entry in self._targets(root, package, name, fromlist, level):
                if entry.path in self._known:
                    continue
                self._known.add(entry.path)
                if entry.digest is None or entry.size > _MAX_FILE:
                    continue
                for d in entry.blob_digests():
                    if d not in self._claimed:
                        self._claimed.add(d)
                        blobs.append(d)
                if entry.path.endswith(".pyc"):
                    pycs[entry.path] = entry
        return blobs, pycs

    def _targets(
        self, root: str, package: str, name: str, fromlist: list[object], level: int
    ) -> list[Entry]:
        if level:
            base = package.split(".") if package else []
            if level - 1 > len(base):
                return []
            base = base[: len(base) - (level - 1)]
            full = ".".join([*base, name] if name else base)
            roots = [root]
        else:
            full = name
            roots = self._roots
        if not full:
            return []
        parts = full.split(".")
        wanted = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
        wanted += [f"{full}.{x}" for x in fromlist if isinstance(x, str) and x != "*"]
        out = []
        for module in wanted:
            for r in roots:
                if (e := self._module_file(r, module)) is not None:
                    out.append(e)
                    break
        return out

    def _module_of(self, path: str) -> tuple[str, str] | None:
        """(root, package) of the module a ``.pyc`` path holds (its package: the one its
        relative imports start from); learns the root and the interpreter's tag from it."""
        if path.startswith("__pycache__/"):
            src_dir, rest = "", path[len("__pycache__/") :]
        else:
            src_dir, _, rest = path.partition(_PYCACHE)
        _, dot, tail = rest.partition(".")
        if not dot or "/" in rest:
            return None
        if self._tag is None:  # "cpython-311" of "cpython-311.pyc" / "cpython-311.opt-1.pyc"
            self._tag = tail.partition(".")[0] or None
        if src_dir not in self._packages:
            parts = src_dir.split("/") if src_dir else []
            k = len(parts)
            while k > 0 and self._file("/".join(parts[:k]) + "/__init__.py") is not None:
                k -= 1
            self._packages[src_dir] = ("/".join(parts[:k]), ".".join(parts[k:]))
            self._add_root(self._packages[src_dir][0])
        return self._packages[src_dir]

    def _add_root(self, root: str) -> None:
        if root in self._roots:
            return
        self._roots.append(root)
        dynload = f"{root}/lib-dynload" if root else "lib-dynload"
        if dynload not in self._roots and self._is_dir(dynload):
            self._roots.append(dynload)

    def _is_dir(self, path: str) -> bool:
        i = self.manifest.find(path)
        return i is not None and self.manifest.kind(i) == "d"

    def _module_file(self, root: str, module: str) -> Entry | None:
        key = (root, module)
        if key not in self._found:
            self._found[key] = self._find_module(root, module)
        return self._found[key]

    def _find_module(self, root: str, module: str) -> Entry | None:
        rel = module.replace(".", "/")
        base = f"{root}/{rel}" if root else rel
        head, _, tail = base.rpartition("/")
        get = self._file
        if get(f"{base}/__init__.py") is not None:
            return get(f"{base}/__pycache__/__init__.{self._tag}.pyc") or get(f"{base}/__init__.py")
        if get(f"{base}.py") is not None:
            cached = f"{head}/__pycache__/{tail}.{self._tag}.pyc" if head else ""
            return (get(cached) if cached else None) or get(f"{base}.py")
        so = self._extensions_in(head).get(tail)
        return get(f"{head}/{so}" if head else so) if so else None

    def _file(self, path: str) -> Entry | None:
        i = self.manifest.find(path)
        if i is None or self.manifest.kind(i) != FILE:
            return None
        return self.manifest.entry(i)

    def _extensions_in(self, folder: str) -> dict[str, str]:
        """Module name -> extension module file in ``folder`` (``m.cpython-311-*.so``,
        ``m.abi3.so``, ``m.so``)."""
        if folder not in self._extensions:
            found: dict[str, str] = {}
            at = self.manifest.find(folder) if folder else None
            if at is not None or not folder:
                for i in self.manifest.children_of(at):
                    name = self.manifest.name(i).decode(errors="replace")
                    if not name.endswith(".so") or self.manifest.kind(i) != FILE:
                        continue
                    stem, _, middle = name[:-3].partition(".")
                    tagged = self._tag is not None and middle.startswith(self._tag)
                    if not middle or middle == "abi3" or tagged:
                        found.setdefault(stem, name)
            self._extensions[folder] = found
        return self._extensions[folder]
