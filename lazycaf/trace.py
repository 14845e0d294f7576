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
from dataclasses import dataclass, field
from typing import Final

from lazycaf.errors import IntegrityError

__all__ = [
    "MAX_RUNS",
    "AccessRecord",
    "HotFile",
    "Profile",
    "Trace",
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

    def to_json(self) -> list[object]:
        return [
            self.path,
            round(self.t, 6),
            self.bytes_read,
            self.source,
            round(self.wait, 6),
            self.digest,
        ]

    @classmethod
    def from_json(cls, row: list[object]) -> AccessRecord:
        path, t, nbytes, source, wait, digest = row
        if not isinstance(path, str) or source not in SOURCES:
            raise ValueError(f"bad trace row {row!r:.100}")
        if not isinstance(t, int | float) or not isinstance(wait, int | float):
            raise ValueError(f"bad trace row {row!r:.100}")
        if not isinstance(nbytes, int):
            raise ValueError(f"bad trace row {row!r:.100}")
        return cls(path, float(t), nbytes, str(source), float(wait), str(digest))


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


@dataclass
class Profile:
    """The newest runs of an executable (newest last); the hot set is derived from them."""

    name: str
    runs: list[Trace] = field(default_factory=list)

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
        for w, run in zip(weights, self.runs, strict=True):
            for r in run.records:
                seen.setdefault(r.path, []).append((r.t, w, r.bytes_read))
        hot = []
        for path, obs in seen.items():
            share = sum(w for _, w, _ in obs) / total
            hot.append(HotFile(path, _weighted_median(obs), share, max(b for _, _, b in obs)))
        hot.sort(key=lambda h: (h.share < _COMMON, h.t, h.path))
        return hot

    def encode(self) -> bytes:
        body = {"version": 1, "name": self.name, "runs": [r.to_json() for r in self.runs]}
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, *, what: str = "profile") -> Profile:
        try:
            obj = json.loads(data)
            if obj.get("version") != 1:
                raise ValueError(f"unsupported version {obj.get('version')!r}")
            return cls(str(obj["name"]), [Trace.from_json(r) for r in obj["runs"]])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
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
