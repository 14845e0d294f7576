"""Prefetch by the import graph: a run without a profile of its own fetches the modules the
ones it loads will import, before the import system asks for them one at a time.

Each ``.pyc`` the run reads (and each one this crawl prefetched, once it is in the cache) is
read from the cache and sent to the scan worker (``lazycaf.mount.importscan``: the imports
its module-level code runs). Each import is resolved against the tree the way the import
system would find it: relative imports in the module's package, absolute ones on each
*root* seen so far (the directory above a module's outermost package: ``lib/python3.11``,
its ``lib-dynload``, ``site-packages``), every package on the way (``import a.b.c`` runs
``a`` and ``a.b`` too) and every name of a ``from`` list that is a submodule. A module is
a package's ``__init__``, else an extension module (``name.*.so``), else its source (in the
import system's order); of a source, its ``.pyc`` in ``__pycache__`` for the interpreter's
tag (the tag of the ``.pyc`` files read) is fetched when the tree has it. What the tree holds is
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
import posixpath
import subprocess
import sys
from collections.abc import Awaitable, Callable
from importlib.util import MAGIC_NUMBER
from typing import Final

import trio

from lazycaf.core.digest import Digest
from lazycaf.core.errors import LazyCafError
from lazycaf.core.manifest import FILE, HARDLINK, SYMLINK, Entry
from lazycaf.core.manifestindex import ManifestIndex
from lazycaf.host.paths import CacheLayout
from lazycaf.host.wire import LineReader
from lazycaf.mount.elfdeps import Missing, elf_deps
from lazycaf.mount.importscan import MAX_FROMLIST, MAX_IMPORTS, MAX_PYC, valid_name

__all__ = ["ImportCrawler"]

log = logging.getLogger(__name__)

_MAX_FILE: Final = 16 << 20  # a larger module file is left to the run's reads (and readahead)
_POLL_S: Final = 0.05  # how often prefetched .pyc files are looked for in the cache
_BATCH: Final = 64  # .pyc files crawled together
_FOREIGN: Final = 8  # another Python's .pyc files read, none of this one's: the crawl stops
_SCAN_TIMEOUT_S: Final = 10.0  # a worker slower than this on a batch (plus below) is stopped
_SCAN_PER_PYC_S: Final = 0.1
_MAX_ANSWER: Final = 1 << 20  # a longer answer line is not believed
_MAX_CRAWLED: Final = 20_000  # modules crawled at most (a bound for a crafted tree)
_PYCACHE: Final = "/__pycache__/"
_WAIT_S: Final = 30.0  # a prefetched file not cached by then is not waited for
_ELF_STAGES: Final = 4  # times a library is read before its needs are known, at most
_LINK_HOPS: Final = 8


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
        self._more = trio.Event()  # set when the crawl adds to _waiting or _elves
        # ELF objects (extension modules, the libraries they need) waiting for chunks to land
        # before the next look at them: path -> (entry, chunk indexes), and looks so far
        self._elves: dict[str, tuple[Entry, tuple[int, ...]]] = {}
        self._elf_looks: dict[str, int] = {}
        self._since: dict[str, float] = {}  # when the poll first saw a path waiting
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
        if not self.working:
            return
        if _is_library(path):
            if path not in self._known and entry.digest is not None:
                self._known.add(path)
                self._elves[path] = (entry, (0,))
                self._more.set()
            return
        if not path.endswith(".pyc") or _PYCACHE not in "/" + path:
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
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        await pipe.aclose()
            log.info(
                "import-graph prefetch: %d modules crawled, %d libraries read, %d blobs "
                "queued; %d files still awaited",
                self.crawled,
                len(self._elf_looks),
                self.queued,
                len(self._waiting) + len(self._elves),
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
        stdin = proc.stdin
        lines = LineReader(proc.stdout)
        async for first in self._ready_out:
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._ready_out.receive_nowait())
                except trio.WouldBlock:
                    break
            read, partial = await trio.to_thread.run_sync(self._read_batch, batch)
            if partial:  # a .pyc of several chunks read before all of them landed
                self._waiting.update((e.path, e) for e in partial)
                self._more.set()
            if not self.crawled and self._foreign >= _FOREIGN:
                log.info("no import-graph prefetch: the .pyc files read are another Python's")
                return
            if not read:
                continue
            raw: list[tuple[str, bytes]] = []
            ended = False

            with trio.move_on_after(_SCAN_TIMEOUT_S + len(read) * _SCAN_PER_PYC_S) as waited:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send, stdin, read)  # while answers are read
                    for path, _ in read:
                        line = await lines.readline()
                        if line is None:
                            ended = True
                            break
                        if len(line) <= _MAX_ANSWER:
                            raw.append((path, line))
                    nursery.cancel_scope.cancel()
            if waited.cancelled_caught or ended:
                how = "stalled" if waited.cancelled_caught else "exited"
                log.warning("import-graph prefetch stopped: the scan worker %s", how)
                return
            blobs, pycs, elves, crawled = await trio.to_thread.run_sync(self._plan_batch, raw)
            self.crawled += crawled
            if blobs:
                self.queued += len(blobs)
                await self._prefetch(blobs)  # logs its own failure: the crawl goes on
            if pycs or elves:
                self._waiting.update(pycs)
                self._elves.update(elves)
                self._more.set()
            if self.crawled >= _MAX_CRAWLED:
                return

    def _read_batch(self, batch: list[Entry]) -> tuple[list[tuple[str, bytes]], list[Entry]]:
        """(path, bytes) of each ``.pyc`` of this interpreter's version in ``batch`` whose
        blobs are cached, and the entries some of whose blobs are not (yet)."""
        out = []
        partial = []
        for entry in batch:
            if entry.size > MAX_PYC:
                continue
            parts = [self._cached(d) for d in entry.blob_digests()]
            if any(part is None for part in parts):
                partial.append(entry)
                continue
            data = b"".join(part for part in parts if part is not None)
            if len(data) != entry.size:
                continue
            if data[:4] != MAGIC_NUMBER:
                self._foreign += 1
                continue
            out.append((entry.path, data))
        return out, partial

    def _plan_batch(
        self, answers: list[tuple[str, bytes]]
    ) -> tuple[list[Digest], dict[str, Entry], dict[str, tuple[Entry, tuple[int, ...]]], int]:
        """Parse the worker's answers (untrusted: a crafted .pyc may have taken it over) and
        plan them; the last value is how many .pyc files it could read."""
        blobs: list[Digest] = []
        pycs: dict[str, Entry] = {}
        crawled = 0
        for path, line in answers:
            try:
                found = json.loads(line)
            except ValueError:
                continue
            if not isinstance(found, list):
                continue
            crawled += 1
            more, new = self._plan(path, found[:MAX_IMPORTS])
            blobs += more
            pycs.update(new)
        elves: dict[str, tuple[Entry, tuple[int, ...]]] = {
            p: (e, (0,)) for p, e in pycs.items() if _is_library(p)
        }
        return blobs, {p: e for p, e in pycs.items() if p not in elves}, elves, crawled

    async def _poll_landed(self) -> None:
        """Hand each prefetched ``.pyc`` to the crawl once all its blobs are cached."""
        while True:
            if not self._waiting and not self._elves:  # sleep until the crawl queues more
                self._more = trio.Event()
                await self._more.wait()
            await trio.sleep(_POLL_S)
            self._expire(trio.current_time())
            if self._waiting:
                waiting = list(self._waiting.values())
                landed = await trio.to_thread.run_sync(self._landed, waiting)
                for entry in landed:
                    if self._waiting.pop(entry.path, None) is not None:
                        self._ready_in.send_nowait(entry)
            if self._elves:
                elves, self._elves = self._elves, {}
                blobs, again = await trio.to_thread.run_sync(self._look_at_elves, elves)
                self._elves.update(again)
                if blobs:
                    self.queued += len(blobs)
                    await self._prefetch(blobs)

    def _expire(self, now: float) -> None:
        """Forget what has waited ``_WAIT_S`` for its blobs (a prefetch that failed): the
        run's own reads fetch it if it is needed."""
        since = self._since
        for path in [*self._waiting, *self._elves]:
            first = since.setdefault(path, now)
            if now - first > _WAIT_S:
                self._waiting.pop(path, None)
                self._elves.pop(path, None)

    def _landed(self, entries: list[Entry]) -> list[Entry]:
        exists = os.path.exists
        blob = self.cache.blob
        return [e for e in entries if all(exists(blob(d)) for d in e.blob_digests())]

    # -- shared libraries (worker threads) -----------------------------------------------
    def _look_at_elves(
        self, elves: dict[str, tuple[Entry, tuple[int, ...]]]
    ) -> tuple[list[Digest], dict[str, tuple[Entry, tuple[int, ...]]]]:
        """Look at each ELF object whose chunks have landed (``lazycaf.mount.elfdeps``): the
        blobs to prefetch (what the loader reads of a large one, the libraries it needs) and
        what to look at again once more chunks land (itself, or a library found)."""
        exists = os.path.exists
        blob = self.cache.blob
        blobs: list[Digest] = []
        again: dict[str, tuple[Entry, tuple[int, ...]]] = {}
        for path, (entry, chunks) in elves.items():
            digests = entry.blob_digests()
            if not all(exists(blob(digests[k])) for k in chunks if k < len(digests)):
                again[path] = (entry, chunks)
                continue
            looks = self._elf_looks.get(path, 0) + 1
            self._elf_looks[path] = looks
            try:
                deps = elf_deps(self._chunk_reader(entry), entry.size)
            except Missing as missing:
                blobs += self._claim(self._chunks_of(entry, missing.loader + missing.wanted))
                if looks < _ELF_STAGES:
                    again[path] = (entry, tuple(self._indexes(entry, missing.wanted)))
                continue
            if deps is None:
                continue
            blobs += self._claim(self._chunks_of(entry, list(deps.loader)))
            for name in deps.needed:
                lib = self._library(path, name, deps.search)
                if lib is None or lib.path in self._known or lib.digest is None:
                    continue
                self._known.add(lib.path)
                whole = lib.size <= _MAX_FILE
                blobs += self._claim(list(lib.blob_digests()) if whole else [])
                blobs += self._claim(list(lib.blob_digests()[:1]))
                again[lib.path] = (lib, (0,))
        return blobs, again

    def _claim(self, digests: list[Digest]) -> list[Digest]:
        out = [d for d in dict.fromkeys(digests) if d not in self._claimed]
        self._claimed.update(out)
        return out

    def _indexes(self, entry: Entry, ranges: list[tuple[int, int]]) -> list[int]:
        """The chunks of ``entry`` that ``ranges`` (offset, length) touch, in order."""
        cs = self.manifest.chunk_size
        out: list[int] = []
        for off, n in ranges:
            if n > 0 and off < entry.size:
                out += range(off // cs, (min(off + n, entry.size) - 1) // cs + 1)
        return list(dict.fromkeys(out))

    def _chunks_of(self, entry: Entry, ranges: list[tuple[int, int]]) -> list[Digest]:
        digests = entry.blob_digests()
        return [digests[k] for k in self._indexes(entry, ranges) if k < len(digests)]

    def _chunk_reader(self, entry: Entry) -> Callable[[int, int], bytes]:
        """``read(offset, n)`` over the cached chunks of ``entry``; ``Missing`` names the
        chunks not cached yet."""
        digests = entry.blob_digests()
        cs = self.manifest.chunk_size
        chunks: dict[int, bytes | None] = {}  # each chunk file read once a look

        def read(off: int, n: int) -> bytes:
            if off < 0 or n <= 0 or off + n > entry.size:
                raise ValueError("outside the file")
            first, last = off // cs, (off + n - 1) // cs
            for k in range(first, last + 1):
                if k not in chunks:
                    chunks[k] = self._cached(digests[k])
            lacking = [(k * cs, cs) for k in range(first, last + 1) if chunks[k] is None]
            if lacking:
                raise Missing(lacking, [])
            data = b"".join(chunks[k] or b"" for k in range(first, last + 1))
            start = off - first * cs
            return data[start : start + n]

        return read

    def _cached(self, digest: Digest) -> bytes | None:
        """A blob's bytes from the host cache, or None when it is not (or no longer) there."""
        try:
            with open(self.cache.blob(digest), "rb") as f:
                return f.read()
        except OSError:
            return None

    def _library(self, origin: str, name: str, search: tuple[str, ...]) -> Entry | None:
        """The tree's file the loader would find for ``name`` needed by ``origin``: on its
        search path (``$ORIGIN``: its directory; paths outside the tree do not count)."""
        if not name or "/" in name:
            return None
        here = origin.rpartition("/")[0]
        for entry in search:
            folder = entry.replace("${ORIGIN}", "$ORIGIN").replace("$ORIGIN", "/" + here)
            if not folder.startswith("/") or "$" in folder:
                continue  # the host's, or another token
            found = self._file(posixpath.normpath(f"{folder}/{name}").lstrip("/"))
            if found is not None:
                return found
        return None

    def _file(self, path: str) -> Entry | None:
        """The file at ``path``, following the tree's symlinks (relative ones, within it),
        as the loader and the import system do."""
        for _ in range(_LINK_HOPS):
            i = self.manifest.find(path) if path and not path.startswith("..") else None
            if i is None:
                return None
            kind = self.manifest.kind(i)
            if kind in (FILE, HARDLINK):
                return self.manifest.entry(i)
            if kind != SYMLINK:
                return None
            target = self.manifest.entry(i).target or ""
            if target.startswith("/"):
                return None
            path = posixpath.normpath(f"{path.rpartition('/')[0]}/{target}").lstrip("/")
        return None

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
            if not isinstance(name, str) or not (name == "" or valid_name(name)):
                continue
            if not isinstance(level, int):
                continue
            if not isinstance(fromlist, list) or level < 0:
                continue
            fromlist = [x for x in fromlist[:MAX_FROMLIST] if valid_name(x)]
            for entry in self._targets(root, package, name, fromlist, level):
                if entry.path in self._known:
                    continue
                self._known.add(entry.path)
                if entry.digest is None:
                    continue
                library = _is_library(entry.path)
                if entry.size <= _MAX_FILE:
                    blobs += self._claim(list(entry.blob_digests()))
                elif library:  # its headers first: then what the loader reads of it
                    blobs += self._claim(list(entry.blob_digests()[:1]))
                else:
                    continue
                if library or entry.path.endswith(".pyc"):
                    pycs[entry.path] = entry  # (an extension module: its libraries next)
        return blobs, pycs

    def _targets(
        self, root: str, package: str, name: str, fromlist: list[object], level: int
    ) -> list[Entry]:
        if level:
            base = package.split(".") if package else []
            if level > len(base):  # beyond the top-level package: an ImportError
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
        if get(f"{base}/__init__.py") is not None:  # the import system's order: a package,
            return get(f"{base}/__pycache__/__init__.{self._tag}.pyc") or get(f"{base}/__init__.py")
        so = self._extensions_in(head).get(tail)  # an extension module, then source
        if so:
            return get(f"{head}/{so}" if head else so)
        if get(f"{base}.py") is not None:
            cached = f"{head}/__pycache__/{tail}.{self._tag}.pyc" if head else ""
            return (get(cached) if cached else None) or get(f"{base}.py")
        return None

    def _extensions_in(self, folder: str) -> dict[str, str]:
        """Module name -> extension module file in ``folder`` (``m.cpython-311-*.so``,
        ``m.abi3.so``, ``m.so``)."""
        if folder not in self._extensions:
            found: dict[str, str] = {}
            at = self.manifest.find(folder) if folder else None
            if at is not None or not folder:
                for i in self.manifest.children_of(at):
                    name = self.manifest.name(i).decode(errors="replace")
                    if not name.endswith(".so") or self.manifest.kind(i) not in (FILE, HARDLINK):
                        continue
                    stem, _, middle = name[:-3].partition(".")
                    tagged = self._tag is not None and middle.startswith(self._tag)
                    if not middle or middle == "abi3" or tagged:
                        found.setdefault(stem, name)
            self._extensions[folder] = found
        return self._extensions[folder]


def _is_library(path: str) -> bool:
    """A name a shared object has: ``x.so``, ``x.cpython-311-x86_64-linux-gnu.so``,
    ``libx.so.1.2``."""
    name = path.rpartition("/")[2]
    return name.endswith(".so") or ".so." in name


async def _send(stdin: trio.abc.SendStream, pycs: list[tuple[str, bytes]]) -> None:
    """Each ``.pyc`` to the scan worker: a little-endian u32 length, then its bytes."""
    for _, data in pycs:
        await stdin.send_all(len(data).to_bytes(4, "little") + data)
