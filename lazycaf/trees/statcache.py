"""What a pack learned about a tree's files, so the next pack hashes only what changed.

Like git's index: a file whose size, mtime, ctime, inode and device are as they were when it
was hashed keeps its digests. ctime moves on every write, even one that restores the mtime.
A file modified within ``_RACY_NS`` of the moment the cache was written may have changed in
the same timestamp tick, so it is hashed again ("racy git"). One JSON file per tree root and
chunk size; losing or corrupting it only costs a full re-hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Final

from lazycaf.core.digest import Digest

__all__ = ["StatCache", "StatKey", "default_stat_cache_dir"]

StatKey = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, ino, dev
_RACY_NS: Final = 2_000_000_000
_VERSION: Final = 1


def default_stat_cache_dir() -> Path:
    return Path(os.environ.get("LAZYCAF_STATE") or Path.home() / ".cache" / "lazycaf" / "pack-stat")


class StatCache:
    """path -> (stat key, digest, chunk digests) for one tree root and chunk size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._old: dict[str, list[object]] = {}
        self._new: dict[str, list[object]] = {}
        self._trusted_before = 0
        self.hits = 0
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_bytes())
            if data["v"] == _VERSION:
                self._old = data["files"]
                self._trusted_before = int(data["saved_ns"]) - _RACY_NS

    @classmethod
    def for_tree(cls, cache_dir: Path, root: Path, chunk_size: int) -> StatCache:
        name = Digest.of(f"{root.resolve()}\0{chunk_size}".encode()).hex[:32]
        return cls(cache_dir / f"{name}.json")

    def lookup(self, rel: str, key: StatKey) -> tuple[Digest, tuple[Digest, ...]] | None:
        try:
            rec = self._old.get(rel)
            if rec is None or rec[0] != list(key) or key[1] >= self._trusted_before:
                return None
            digest = Digest.parse(str(rec[1]))
            chunks = tuple(Digest.parse(c) for c in rec[2])  # type: ignore[attr-defined]
        except Exception:  # a damaged cache file only costs a re-hash
            return None
        self.hits += 1
        self._new[rel] = rec
        return digest, chunks

    def record(self, rel: str, key: StatKey, digest: Digest, chunks: tuple[Digest, ...]) -> None:
        self._new[rel] = [list(key), digest.hex, [c.hex for c in chunks]]

    def save(self) -> None:
        """Atomically replace the file with what this pack saw (files gone are dropped)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {"v": _VERSION, "saved_ns": time.time_ns(), "files": self._new},
            separators=(",", ":"),
        ).encode()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
