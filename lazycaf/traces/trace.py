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
        return {
            "executable": self.executable,
            "started": self.started,
            "records": [r.to_json() for r in self.records],
        }

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> Trace:
        rows = obj["records"]
        if not isinstance(rows, list):
            raise ValueError("records is not a list")
        return cls(
            str(obj["executable"]),
            float(obj["started"]),  # type: ignore[arg-type]
            [AccessRecord.from_json(r) for r in rows],
        )


@dataclass(frozen=True)
class HotFile:
    path: str
    t: float  # typical first-access time (s since mount)
    share: float  # weighted share of runs that touched it
    bytes_read: int
    chunks: frozenset[int]  # chunks any run read (chunked files; empty: the whole file)


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
        for w, run in zip(weights, self.runs, strict=True):
            for r in run.records:
                seen.setdefault(r.path, []).append((r.t, w, r.bytes_read))
                chunks.setdefault(r.path, set()).update(r.chunks)
        hot = []
        for path, obs in seen.items():
            share = sum(w for _, w, _ in obs) / total
            t = _weighted_median(obs)
            most = max(b for _, _, b in obs)
            hot.append(HotFile(path, t, share, most, frozenset(chunks[path])))
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
            self.touched_bytes += new_blob_bytes(rec.chunks)
        elif not rec.chunks.issuperset(chunks):
            before = set(rec.chunks)
            rec.chunks.update(chunks)
            self.touched_bytes += new_blob_bytes(rec.chunks - before)
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
    recorded); paths the tree no longer has are skipped.
    """
    out: dict[Digest, None] = {}
    for h in hot:
        e = entries.get(h.path)
        if e is None or e.digest is None:
            continue
        blobs = e.blob_digests()
        if e.chunks and h.chunks:
            picked = [blobs[i] for i in sorted(h.chunks) if i < len(blobs)]
        else:
            picked = list(blobs)
        for d in picked:
            out.setdefault(d, None)
    return list(out)
