"""Blob files on disk under the host cache: atomic commit and start-up reconciliation.

Layout::

    <cache>/index.lmdb/          the LMDB index (``lazycaf.index``)
    <cache>/blobs/<2 hex>/<hex>  verified blob content, uncompressed (Btrfs compresses it)
    <cache>/tmp/                 downloads in flight

Invariant: a file appears under ``blobs/`` only after its content verified against its name:
write to ``tmp/``, rename, then commit the index. One fsync per blob costs more than the
fetch itself on a cold start (hundreds of small blobs), so durability is batched instead:
the index marks a new blob unsynced, ``flush()`` (the daemon calls it every second) makes
every pending file durable with one ``syncfs`` and then marks them synced. After a crash,
``reconcile()`` removes temp files and re-verifies every blob that is unsynced or missing from
the index, so no blob that reads wrong survives a restart; mounts start the daemon (and so the
reconciliation) before they read. Sync code: the daemon calls it through worker threads.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from lazycaf import framing
from lazycaf.digest import Digest, Hasher
from lazycaf.index import BlobRecord, Index
from lazycaf.syncfs import syncfs

__all__ = ["BlobCache", "Reconciled", "blob_path", "filesystem_type", "init_cache_dir"]


def blob_path(cache_root: Path, digest: Digest) -> Path:
    h = digest.hex
    return cache_root / "blobs" / h[:2] / h


@dataclass(frozen=True)
class Reconciled:
    temp_removed: int
    verified: int
    dropped: int
    blobs: int


class BlobCache:
    """The daemon's view of the cache: the only writer of blob files and of the index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("blobs", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.index = Index(root / "index.lmdb")
        self._pending: list[Digest] = []
        self._pending_lock = threading.Lock()

    def close(self) -> None:
        self.index.close()

    def path(self, digest: Digest) -> Path:
        return blob_path(self.root, digest)

    def has(self, digest: Digest) -> bool:
        return digest in self.index and self.path(digest).exists()

    def commit(self, digest: Digest, encoding: str, payload: bytes) -> int:
        """Decode, verify and store a blob; returns its size. Raises IntegrityError."""
        data = framing.decode(encoding, payload, what=f"blob {digest}")
        digest.verify(data)
        final = self.path(digest)
        final.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=digest.hex[:16] + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._pending_lock:
            self.index.put(digest, len(data), synced=False)
            self._pending.append(digest)
        return len(data)

    def flush(self) -> int:
        """Make every blob committed so far durable (one syncfs); returns how many."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        if not pending:
            return 0
        syncfs(self.root)
        self.index.mark_synced(pending)
        self.index.sync()
        return len(pending)

    def reconcile(self) -> Reconciled:
        """Make index and files agree after a crash: drop temp files, index stray blobs,
        forget index entries whose file is gone."""
        removed = 0
        for tmp in (self.root / "tmp").iterdir():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
        on_disk: dict[Digest, Path] = {}
        for sub in (self.root / "blobs").iterdir():
            for f in sub.iterdir():
                if Digest.is_hex(f.name):
                    on_disk[Digest.parse(f.name)] = f
                else:
                    f.unlink()
        indexed = dict(self.index.items())
        doubtful = [d for d in on_disk if d not in indexed or not indexed[d].synced]
        bad = [d for d in doubtful if not _verifies(d, on_disk[d])]
        for d in bad:
            on_disk.pop(d).unlink()
        stale = [d for d in indexed if d not in on_disk]
        self.index.delete_many(stale)
        syncfs(self.root)
        fixed = [
            (
                d,
                BlobRecord(
                    on_disk[d].stat().st_size, indexed[d].last_access_ns if d in indexed else 0
                ),
            )
            for d in doubtful
            if d in on_disk
        ]
        self.index.put_many(fixed)
        self.index.sync()
        return Reconciled(removed, len(fixed), len(stale) + len(bad), len(on_disk))


def _verifies(digest: Digest, path: Path) -> bool:
    h = Hasher()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest() == digest


def filesystem_type(path: Path) -> str:
    """The filesystem type name of ``path`` (``btrfs``, ``ext2/ext3``, ``tmpfs``, ...)."""
    out = subprocess.run(
        ["stat", "-f", "--format=%T", str(path)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def init_cache_dir(path: Path) -> tuple[str, bool]:
    """Create a cache directory; on Btrfs turn zstd compression on for it.

    Returns (filesystem type, compression enabled). New files inherit the property.
    """
    for sub in ("blobs", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    fs = filesystem_type(path)
    if fs != "btrfs":
        return fs, False
    for target in (path, path / "blobs", path / "tmp"):
        subprocess.run(
            ["btrfs", "property", "set", str(target), "compression", "zstd"],
            check=True,
            capture_output=True,
        )
    return fs, True
