"""Access traces, profiles and prefetch plans (pure: no I/O, no trio).

A *trace* is one run's first access of each file: when (seconds since mount), which path and
digest, how many bytes were read, where the bytes came from (``cache``, ``prefetch`` or an
on-demand ``fetch``) and how long the reader waited. A *profile* keeps the newest
``MAX_RUNS`` traces of an executable; its hot set orders files by their typical first-access
time, files seen in most runs first, the newest runs weighing most. Profiles name files by
path, so a profile recorded on version N plans prefetch for version N+1: changed files are
fetched under their new digests, unchanged ones are already cached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from lazycaf.cas.bundle import Bundle
from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError
from lazycaf.core.manifest import Entry

__all__ = [
    "MAX_RUNS",
    "AccessRecord",
    "HotFile",
    "Profile",
    "Trace",
    "TraceRecorder",
    "plan_prefetch",
]

MAX_RUNS: Final = 8
_DECAY: Final = 0.6  # weight of a run = _DECAY ** (its age: 0 for the newest)
_COMMON: Final = 0.5  # files in at least this weighted share of runs come first
SOURCES: Final = ("cache", "prefetch", "fetch")


@dataclass
class AccessRecord:
    """The first access of one file in one run (``bytes_read`` grows with later reads)."""

    path: str
    t: float
    bytes_read: int = 0
    source: str = "cache"
    wait: float = 0.0
    digest: str = ""
    chunks: set[int] = field(default_factory=set)  # chunk indices read (chunked files)
    # when each chunk was first read (s since mount); older traces have none (``chunk_at``)
    chunk_t: dict[int, float] = field(default_factory=dict, compare=False)

    def chunk_at(self, chunk: int) -> float:
        """When ``chunk`` was first read: its own time if recorded, else the file's."""
        return self.chunk_t.get(chunk, self.t)

    def to_json(self) -> list[object]:
        return [
            self.path,
            round(self.t, 6),
            self.bytes_read,
            self.source,
            round(self.wait, 6),
            self.digest,
            sorted(self.chunks),
        ]

    @classmethod
    def from_json(cls, row: list[object]) -> AccessRecord:
        path, t, nbytes, source, wait, digest, chunks = row
        if not isinstance(path, str) or source not in SOURCES:
            raise ValueError(f"bad trace row {row!r:.100}")
        if not isinstance(t, int | float) or not isinstance(wait, int | float):
            raise ValueError(f"bad trace row {row!r:.100}")
        if not isinstance(nbytes, int):
            raise ValueError(f"bad trace row {row!r:.100}")
        if not isinstance(chunks, list) or not all(isinstance(c, int) for c in chunks):
            raise ValueError(f"bad trace row {row!r:.100}")
        return cls(path, float(t), nbytes, str(source), float(wait), str(digest), set(chunks))


@dataclass
class Trace:
    """One run: the records in first-access order."""

    executable: str
    started: float = field(default_factory=time.time)
    records: list[AccessRecord] = field(default_factory=list)

    def wait_seconds(self) -> float:
        return sum(r.wait for r in self.records)

    def to_json(self) -> dict[str, object]:
        """The rows, and beside them (a key older readers skip) the first-read time of each
        chunk of the files read in several, by row: ``{"<row>": [chunk, t, chunk, t...]}``."""
        chunk_t = {
            str(i): [x for c, t in r.chunk_t.items() for x in (c, round(t, 4))]
            for i, r in enumerate(self.records)
            if len(r.chunk_t) > 1
        }
        return {
            "executable": self.executable,
            "started": self.started,
            "records": [r.to_json() for r in self.records],
            **({"chunk_t": chunk_t} if chunk_t else {}),
        }

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> Trace:
        rows = obj["records"]
        if not isinstance(rows, list):
            raise ValueError("records is not a list")
        records = [AccessRecord.from_json(r) for r in rows]
        chunk_t = obj.get("chunk_t", {})
        if not isinstance(chunk_t, dict):
            raise ValueError("chunk_t is not an object")
        for key, flat in chunk_t.items():
            i = int(key) if isinstance(key, str) and key.isdigit() else -1
            if not 0 <= i < len(records) or not isinstance(flat, list) or len(flat) % 2:
                raise ValueError(f"bad chunk_t entry {key!r:.20}")
            pairs = zip(flat[::2], flat[1::2], strict=True)
            if not all(isinstance(c, int) and isinstance(t, int | float) for c, t in pairs):
                raise ValueError(f"bad chunk_t entry {key!r:.20}")
            records[i].chunk_t = {c: float(t) for c, t in zip(flat[::2], flat[1::2], strict=True)}
        return cls(
            str(obj["executable"]),
            float(obj["started"]),  # type: ignore[arg-type]
            records,
        )


@dataclass(frozen=True)
class HotFile:
    path: str
    t: float  # typical first-access time (s since mount)
    share: float  # weighted share of runs that touched it
    bytes_read: int
    chunks: frozenset[int]  # chunks any run read (chunked files; empty: the whole file)
    # typical first-read time of each chunk where runs recorded one (``plan_prefetch``)
    chunk_t: Mapping[int, float] = field(default_factory=dict, compare=False)


@dataclass
class Profile:
    """The newest runs of an executable (newest last); the hot set is derived from them."""

    name: str
    runs: list[Trace] = field(default_factory=list)
    # its hot set as one blob (``lazycaf.cas.bundle``), planned on this executable's tree
    bundle: Bundle | None = None
    bundle_for: str = ""

    def add(self, trace: Trace) -> None:
        self.runs.append(trace)
        del self.runs[:-MAX_RUNS]

    def hot_set(self) -> list[HotFile]:
        """Files in prefetch order: those most runs touched first, each group by time."""
        n = len(self.runs)
        if n == 0:
            return []
        weights = [_DECAY ** (n - 1 - i) for i in range(n)]
        total = sum(weights)
        seen: dict[str, list[tuple[float, float, int]]] = {}
        chunks: dict[str, set[int]] = {}
        chunk_obs: dict[str, dict[int, list[tuple[float, float, int]]]] = {}
        for w, run in zip(weights, self.runs, strict=True):
            for r in run.records:
                seen.setdefault(r.path, []).append((r.t, w, r.bytes_read))
                chunks.setdefault(r.path, set()).update(r.chunks)
                if r.chunk_t:
                    by_chunk = chunk_obs.setdefault(r.path, {})
                    for c in r.chunks:
                        by_chunk.setdefault(c, []).append((r.chunk_at(c), w, 0))
        hot = []
        for path, obs in seen.items():
            share = sum(w for _, w, _ in obs) / total
            t = _weighted_median(obs)
            most = max(b for _, _, b in obs)
            chunk_t = {c: _weighted_median(o) for c, o in chunk_obs.get(path, {}).items()}
            hot.append(HotFile(path, t, share, most, frozenset(chunks[path]), chunk_t))
        hot.sort(key=lambda h: (h.share < _COMMON, h.t, h.path))
        return hot

    def encode(self) -> bytes:
        body: dict[str, object] = {
            "version": 1,
            "name": self.name,
            "runs": [r.to_json() for r in self.runs],
        }
        if self.bundle is not None:
            body["bundle"] = {**self.bundle.to_json(), "executable": self.bundle_for}
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, *, what: str = "profile") -> Profile:
        try:
            obj = json.loads(data)
            if obj.get("version") != 1:
                raise ValueError(f"unsupported version {obj.get('version')!r}")
            profile = cls(str(obj["name"]), [Trace.from_json(r) for r in obj["runs"]])
            bundle = obj.get("bundle")
            try:  # a bundle this version cannot read costs the bundle, not the profile
                profile.bundle = None if bundle is None else Bundle.from_json(bundle)
                profile.bundle_for = str(bundle.get("executable", "")) if bundle else ""
            except (ValueError, AttributeError):
                profile.bundle = None
            return profile
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise IntegrityError(f"{what} is not a valid profile: {exc}") from None


def _weighted_median(obs: list[tuple[float, float, int]]) -> float:
    ordered = sorted(obs)
    half = sum(w for _, w, _ in ordered) / 2
    acc = 0.0
    for t, w, _ in ordered:
        acc += w
        if acc >= half:
            return t
    return ordered[-1][0]


class TraceRecorder:
    """Builds the current run's trace as reads happen (cheap: one dict lookup per read)."""

    def __init__(self, executable: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.executable = executable
        self._clock = clock
        self._t0 = clock()
        self._started = time.time()
        self._by_inode: dict[int, AccessRecord] = {}
        self.records: list[AccessRecord] = []
        self.touched_bytes = 0  # bytes of distinct blobs read so far (for eager mode)

    def read(
        self,
        inode: int,
        path: str,
        digest: str,
        nbytes: int,
        *,
        source: str,
        wait: float,
        new_blob_bytes: Callable[[set[int]], int],
        chunks: range,
    ) -> None:
        """Account a read of ``nbytes``; ``new_blob_bytes(seen_chunks)`` sizes blobs this
        read touched for the first time (called only when something is new)."""
        rec = self._by_inode.get(inode)
        if rec is None:
            rec = AccessRecord(path, self._clock() - self._t0, 0, source, 0.0, digest)
            self._by_inode[inode] = rec
            self.records.append(rec)
            rec.chunks.update(chunks)
            rec.chunk_t.update(dict.fromkeys(chunks, rec.t))
            self.touched_bytes += new_blob_bytes(rec.chunks)
        elif not rec.chunks.issuperset(chunks):
            new = set(chunks) - rec.chunks
            rec.chunks.update(new)
            rec.chunk_t.update(dict.fromkeys(sorted(new), self._clock() - self._t0))
            self.touched_bytes += new_blob_bytes(new)
        rec.bytes_read += nbytes
        rec.wait += wait

    def seen(self, inode: int) -> bool:
        return inode in self._by_inode

    def trace(self) -> Trace:
        return Trace(self.executable, self._started, list(self.records))


def plan_prefetch(
    hot: list[HotFile], entries: Mapping[str, Entry], chunk_size: int
) -> list[Digest]:
    """The blobs of ``hot`` in the current tree, in order, each once.

    Paths carry over between versions: a file whose content changed is planned under its new
    digest. Chunked files contribute only the chunks some run read (all of them if none was
    recorded); paths the tree no longer has are skipped. A chunk whose first read was
    recorded goes where that time falls among the files of its group (``hot`` is in groups
    of rising time), not with its file's first read: a large mmapped library is read a
    page here and there while the run goes on, and its chunks in index order at the
    file's first access put the ones read first behind those read seconds later.
    """
    keyed: list[tuple[int, float, int, int, Digest]] = []
    group, last = 0, float("-inf")
    for k, h in enumerate(hot):
        if h.t < last:  # the next group (the files fewer runs read) starts over in time
            group += 1
        last = h.t
        e = entries.get(h.path)
        if e is None or e.digest is None:
            continue
        blobs = e.blob_digests()
        if e.chunks and h.chunks:
            picked = [(i, blobs[i]) for i in sorted(h.chunks) if i < len(blobs)]
        else:
            picked = list(enumerate(blobs))
        for i, d in picked:
            keyed.append((group, max(h.chunk_t.get(i, h.t), h.t), k, i, d))
    keyed.sort(key=lambda item: item[:4])
    return list(dict.fromkeys(d for *_, d in keyed))
