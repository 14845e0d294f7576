"""What a pack learned about a tree's files, so the next pack hashes only what changed.

Like git's index: a file whose size, mtime, ctime, inode and device are as they were when it
was hashed keeps its digests. ctime moves on every write, even one that restores the mtime.
A file modified within ``_RACY_NS`` of the moment the cache was written may have changed in
the same timestamp tick, so it is hashed again ("racy git"). One file per tree root and
chunk size; losing or corrupting it only costs a full re-hash.

It also remembers the pack that wrote it: the store, the ref it set and the manifest digest
(``last_pack``). While that ref still names that manifest, every digest here is a blob the
store holds and a root keeps from its GC, so the next pack need not ask about them
(``lazycaf.trees.pack``).

Format: ``_MAGIC`` then ``marshal`` of ``(saved_ns, {path: (stat key, digest, chunks)},
last_pack)`` with the digest as 32 raw bytes and the chunk digests as one string of 32-byte
digests; ``last_pack`` is ``(store, ref, raw manifest digest)`` or None. At
300,000 files it loads in ~0.2 s and saves in ~0.1 s (JSON with hex digests: 2 s and 1.8 s).
``marshal`` is Python's own format; a file another Python version cannot read, like any
damaged one, is an empty cache. Lookups check every field's type, so a record of the wrong
shape misses instead of failing the pack.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import tempfile
import time
from pathlib import Path
from typing import Final

from lazycaf.core.digest import DIGEST_SIZE, Digest

__all__ = ["RawHashes", "StatCache", "StatKey", "default_stat_cache_dir"]

StatKey = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, ino, dev
RawHashes = tuple[bytes, bytes]  # raw digest, raw chunk digests joined (b"": one blob)
Record = tuple[StatKey, bytes, bytes]  # stat key, raw digest, raw chunk digests
LastPack = tuple[str, str, Digest]  # store (``CAS.where``), ref, manifest digest
_RACY_NS: Final = 2_000_000_000
_MAGIC: Final = b"LZCAFSTAT3\n"
_MAGIC_V2: Final = b"LZCAFSTAT2\n"  # no last_pack


def default_stat_cache_dir() -> Path:
    return Path(os.environ.get("LAZYCAF_STATE") or Path.home() / ".cache" / "lazycaf" / "pack-stat")


class StatCache:
    """path -> (stat key, digest, chunk digests) for one tree root and chunk size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._old: dict[str, Record] = {}
        self._new: dict[str, Record] = {}
        self._trusted_before = 0
        self.hits = 0
        self.last_pack: LastPack | None = None  # the pack that wrote the file
        self._this_pack: LastPack | None = None
        with contextlib.suppress(OSError, ValueError, EOFError, TypeError):
            data = path.read_bytes()
            saved_ns, files, last = None, None, None
            if data.startswith(_MAGIC):
                saved_ns, files, last = marshal.loads(memoryview(data)[len(_MAGIC) :])
            elif data.startswith(_MAGIC_V2):
                saved_ns, files = marshal.loads(memoryview(data)[len(_MAGIC_V2) :])
            if isinstance(saved_ns, int) and isinstance(files, dict):
                self._old = files
                self._trusted_before = saved_ns - _RACY_NS
                self.last_pack = _last_pack(last)

    @classmethod
    def for_tree(
        cls, cache_dir: Path, root: Path, chunk_size: int, *, variant: str = ""
    ) -> StatCache:
        """The cache of one tree packed one way (``variant``: e.g. ``normalize``, whose
        digests are of rewritten bytes)."""
        key = f"{root.resolve()}\0{chunk_size}" + (f"\0{variant}" if variant else "")
        name = Digest.of(key.encode()).hex[:32]
        return cls(cache_dir / f"{name}.stat")

    def lookup(self, rel: str, key: StatKey) -> RawHashes | None:
        """The file's digests as raw bytes, if its stat key is as recorded and not racy: no
        ``Digest`` object per hit (a re-pack's manifest is built from the raw bytes)."""
        rec = self._old.get(rel)
        if rec is None or key[1] >= self._trusted_before:
            return None
        try:
            old_key, raw, chunks = rec
        except (TypeError, ValueError):  # a damaged record only costs a re-hash
            return None
        if old_key != key or type(raw) is not bytes or type(chunks) is not bytes:
            return None
        if len(raw) != DIGEST_SIZE or len(chunks) % DIGEST_SIZE:
            return None
        self.hits += 1
        self._new[rel] = rec
        return raw, chunks

    def record(self, rel: str, key: StatKey, digest: Digest, chunks: tuple[Digest, ...]) -> None:
        self._new[rel] = (key, digest.raw, b"".join(c.raw for c in chunks))

    def remember_pack(self, store: str, ref: str, manifest: Digest) -> None:
        """What ``save`` records as ``last_pack``: this pack set ``ref`` in ``store``."""
        self._this_pack = (store, ref, manifest)

    def save(self) -> None:
        """Atomically replace the file with what this pack saw (files gone are dropped)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last = self._this_pack
        saved = None if last is None else (last[0], last[1], last[2].raw)
        body = _MAGIC + marshal.dumps((time.time_ns(), self._new, saved))
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
        with contextlib.suppress(OSError):  # the JSON file of earlier versions
            self.path.with_suffix(".json").unlink()


def _last_pack(value: object) -> LastPack | None:
    """``last_pack`` as saved, or None for anything of another shape."""
    if not isinstance(value, tuple) or len(value) != 3:
        return None
    store, ref, raw = value
    if type(store) is not str or type(ref) is not str or type(raw) is not bytes:
        return None
    if len(raw) != DIGEST_SIZE:
        return None
    return store, ref, Digest.trusted(raw)
