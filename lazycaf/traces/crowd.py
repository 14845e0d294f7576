"""Crowd prefetch: what other executables' runs read, by file digest (pure: no I/O, no trio).

A new executable shares most of its files with others: the same interpreter, the same numpy,
the same torch, byte for byte, so under the same digests. When a mount has no profile of its
own, the profiles of every other executable in the CAS still say which of those files a run
reads and how early. ``crowd_hot_set`` merges them: one ``CrowdFile`` per file digest, with
``weight``, how many executables read it (each counts the share of its runs that did, 0 to
1), and ``t``, its typical first-access time across them. ``plan_crowd`` keeps the files this
executable holds and orders them as a profile's hot set is ordered: the files most of the
related executables read first, each group by time.

Trace records name a file by path and digest; a profile's hot set is by path, so each path
takes the digest its newest run recorded. Chunk indices carry over as recorded: executables
packed with another chunk size may prefetch other chunks of a big file than a run reads
(wasted bytes, never wrong ones: every blob is verified when fetched).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from lazycaf.core.digest import Digest
from lazycaf.core.manifest import Entry
from lazycaf.traces.trace import HotFile, Profile, plan_prefetch

__all__ = ["MAX_CROWD_FILES", "CrowdFile", "crowd_hot_set", "plan_crowd", "profile_files"]

#: The most files a crowd hot set keeps (the heaviest first): a bound on what the daemon
#: sends a mount, whatever the number of profiles in the CAS.
MAX_CROWD_FILES: Final = 20_000  # ~2 MB of JSON to a mount
_COMMON: Final = 0.5  # files read by at least this share of the heaviest weight come first


@dataclass(frozen=True)
class CrowdFile:
    digest: str  # the file's digest, hex
    t: float  # typical first-access time (s since mount), across executables
    weight: float  # executables that read it, each counting its share of runs (0..1)
    bytes_read: int
    chunks: frozenset[int]  # chunks any run read (empty: the whole file)

    def to_json(self) -> list[object]:
        return [self.digest, round(self.t, 6), round(self.weight, 4), self.bytes_read,
                sorted(self.chunks)]  # fmt: skip

    @classmethod
    def from_json(cls, row: list[object]) -> CrowdFile:
        digest, t, weight, nbytes, chunks = row
        if not isinstance(digest, str) or not Digest.is_hex(digest):
            raise ValueError(f"bad crowd row {row!r:.100}")
        if not isinstance(t, int | float) or not isinstance(weight, int | float):
            raise ValueError(f"bad crowd row {row!r:.100}")
        if not isinstance(nbytes, int) or not isinstance(chunks, list):
            raise ValueError(f"bad crowd row {row!r:.100}")
        if not all(isinstance(c, int) for c in chunks):
            raise ValueError(f"bad crowd row {row!r:.100}")
        return cls(digest, float(t), float(weight), nbytes, frozenset(chunks))


def profile_files(profile: Profile) -> list[CrowdFile]:
    """One executable's hot set by digest (weights are its share of runs, at most 1)."""
    digests: dict[str, str] = {}
    for run in profile.runs:  # oldest first: the newest run's digest of a path wins
        for r in run.records:
            if Digest.is_hex(r.digest):
                digests[r.path] = r.digest
    out = []
    for h in profile.hot_set():
        digest = digests.get(h.path)
        if digest is not None:
            out.append(CrowdFile(digest, h.t, h.share, h.bytes_read, h.chunks))
    return out


def crowd_hot_set(per_profile: Iterable[list[CrowdFile]]) -> list[CrowdFile]:
    """Merge executables' hot sets: per digest the summed weight, the weighted median time,
    the most bytes read and every chunk read; the ``MAX_CROWD_FILES`` heaviest, by time."""
    seen: dict[str, list[CrowdFile]] = {}
    for files in per_profile:
        for f in files:
            seen.setdefault(f.digest, []).append(f)
    merged = []
    for digest, obs in seen.items():
        weight = sum(f.weight for f in obs)
        chunks = frozenset().union(*(f.chunks for f in obs))
        most = max(f.bytes_read for f in obs)
        merged.append(CrowdFile(digest, _weighted_median(obs), weight, most, chunks))
    merged.sort(key=lambda f: (-f.weight, f.t, f.digest))
    kept = merged[:MAX_CROWD_FILES]
    kept.sort(key=lambda f: (f.t, f.digest))
    return kept


def plan_crowd(crowd: list[CrowdFile], files: Mapping[str, Entry], chunk_size: int) -> list[Digest]:
    """The blobs to prefetch for an executable with no profile: the crowd's files that it
    holds (``files``: its file entries by digest hex), those most related executables read
    first, each group by time."""
    matched = [(f, files[f.digest]) for f in crowd if f.digest in files]
    if not matched:
        return []
    top = max(f.weight for f, _ in matched)
    matched.sort(key=lambda fe: (fe[0].weight < _COMMON * top, fe[0].t, fe[0].digest))
    hot = [HotFile(e.path, f.t, f.weight, f.bytes_read, f.chunks) for f, e in matched]
    return plan_prefetch(hot, {e.path: e for _, e in matched}, chunk_size)


def _weighted_median(obs: list[CrowdFile]) -> float:
    ordered = sorted(obs, key=lambda f: f.t)
    half = sum(f.weight for f in ordered) / 2
    acc = 0.0
    for f in ordered:
        acc += f.weight
        if acc >= half:
            return f.t
    return ordered[-1].t
