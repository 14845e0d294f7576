"""The host cache's LMDB index (the only ``lmdb`` importer).

Tables of one environment:

- the main table: blob digest (32 bytes) -> ``BlobRecord`` (size, last access, synced,
  plain);
- ``executables``: manifest digest -> ``ExecutableRecord`` (pin count, last mount): the
  executables this cache has mounted or pinned, for pins, GC and ``cache status``;
- ``refs``: ref name -> the manifest digest it last resolved to (``mount --offline``);
- ``meta``: small settings of the cache (the byte budget).

LMDB keeps the names of the named tables as keys of the main table; they are never 32 bytes
long, so blob iteration skips them. Pins are counted per executable, not per blob: a blob is
pinned while any pinned executable's manifest names it (``BlobRecord.pins`` stays 0, kept
only so old indexes decode).

The daemon is the one writer; mounts and ``cache status`` open the index read-only and look
blobs up without a round trip to the daemon. Blob files are the truth (a file exists only
after it verified), the index is rebuilt from them on daemon start, so commits need not be
synced one by one: the environment runs with ``sync=False`` and the daemon syncs it in
batches. Never fork after opening an ``Index`` (LMDB forbids it). Write failures (a full
disk) raise ``Unavailable``, or ``CacheFull`` when the disk is out of space. LMDB's lock file
lives off the cache disk for root (``lazycaf.host.indexlock``): on a full disk a write
through its mapping would kill the process.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import lmdb

from lazycaf.core.digest import Digest
from lazycaf.core.errors import CacheFull, Unavailable
from lazycaf.host.indexlock import LOCK_NAME, prepare_lock

__all__ = ["BlobRecord", "ExecutableRecord", "Index"]

_VALUE: Final = struct.Struct("<QQIB")  # size, last access (ns), pins, flags
_SYNCED: Final = 1
_PLAIN: Final = 2
_EXE: Final = struct.Struct("<IQ")  # pins, last mounted (ns)
_MAP_SIZE: Final = 1 << 34  # 16 GiB of address space; the file grows as needed
_TABLES: Final = (b"executables", b"refs", b"meta")


class BlobRecord(NamedTuple):
    """``synced`` is False until the blob file's bytes are known to be on disk (syncfs);
    ``plain``: written without the filesystem's compression, to be compressed later
    (``BlobCache.compress``)."""

    size: int
    last_access_ns: int
    pins: int = 0
    synced: bool = True
    plain: bool = False


def _pack(rec: BlobRecord) -> bytes:
    flags = (_SYNCED if rec.synced else 0) | (_PLAIN if rec.plain else 0)
    return _VALUE.pack(rec.size, rec.last_access_ns, rec.pins, flags)


def _unpack(value: bytes) -> BlobRecord:
    size, last, pins, flags = _VALUE.unpack(value)
    return BlobRecord(size, last, pins, bool(flags & _SYNCED), bool(flags & _PLAIN))


class ExecutableRecord(NamedTuple):
    pins: int
    last_mounted_ns: int  # 0: pinned, never mounted


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except lmdb.Error as exc:
        if "No space left" in str(exc):
            raise CacheFull(f"cache index: {what}: {exc}") from exc
        raise Unavailable(f"cache index: {what}: {exc}") from exc


def _lock_file_id(index: Path) -> tuple[int, int] | None:
    """The lock file LMDB opens (through the link, if any), as (device, inode)."""
    try:
        st = os.stat(index / LOCK_NAME)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_OPEN: set[tuple[int, int]] = set()  # (device, inode) of the indexes this process has open
_OPEN_LOCK = threading.Lock()


class Index:
    """The tables above. Thread-safe: LMDB transactions are per call. One ``Index`` of a
    path at a time in a process."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise Unavailable(f"cannot open cache index {path}: {exc.strerror}") from exc
        ident = (st.st_dev, st.st_ino)  # as the lock file is named: any path to it
        with _OPEN_LOCK:  # LMDB forbids it, and a second lock set-up would reset the first
            if ident in _OPEN:
                raise Unavailable(f"cache index {path} is already open in this process")
            _OPEN.add(ident)
        self._ident = ident
        self._lock_fd: int | None = None
        try:
            self._env = self._open_env(path, readonly)
        except (lmdb.Error, OSError) as exc:
            self._release()
            raise Unavailable(f"cannot open cache index {path}: {exc}") from exc
        except BaseException:
            self._release()
            raise
        self._tables: dict[bytes, Any] = {}
        if not readonly:
            try:
                with _mapped("create tables"):
                    self._env.reader_check()  # clear reader slots of killed mounts
                    for name in _TABLES:
                        self._tables[name] = self._env.open_db(name)
            except BaseException:
                self.close()
                raise

    def _open_env(self, path: Path, readonly: bool) -> Any:
        """LMDB's environment, its lock file prepared (``indexlock``). The lock file may move
        while LMDB opens it (the daemon moving an old cache's, which it empties): then that
        one is not the others', and it opens again."""
        for _attempt in range(3):
            self._lock_fd = prepare_lock(path, readonly=readonly)
            before = _lock_file_id(path)
            try:
                env = lmdb.open(
                    str(path),
                    map_size=_MAP_SIZE,
                    readonly=readonly,
                    sync=False,
                    metasync=False,
                    max_readers=512,
                    max_dbs=len(_TABLES),
                    lock=True,
                    subdir=True,
                    create=not readonly,
                )
            except lmdb.Error:
                if _lock_file_id(path) == before:
                    raise
                self._close_lock_fd()
                continue
            if _lock_file_id(path) == before:
                return env
            env.close()
            self._close_lock_fd()
        raise Unavailable(f"cannot open cache index {path}: its lock file keeps moving")

    def close(self) -> None:
        self._env.close()
        self._release()

    def _close_lock_fd(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _release(self) -> None:
        """After the environment closed: the lock file's descriptor, the path's slot."""
        self._close_lock_fd()
        with _OPEN_LOCK:
            _OPEN.discard(self._ident)

    def _table(self, name: bytes) -> Any | None:
        """A named table; None when a read-only index has none yet (an older cache)."""
        if name not in self._tables:
            try:
                self._tables[name] = self._env.open_db(name, create=False)
            except lmdb.NotFoundError:
                return None
        return self._tables[name]

    # -- blobs ------------------------------------------------------------------------------
    def get(self, digest: Digest) -> BlobRecord | None:
        with self._env.begin(buffers=False) as txn:
            value = txn.get(digest.raw)
        return None if value is None else _unpack(value)

    def __contains__(self, digest: Digest) -> bool:
        with self._env.begin() as txn:
            return txn.get(digest.raw) is not None

    def put_many(self, records: Iterable[tuple[Digest, BlobRecord]]) -> None:
        with _mapped("put"), self._env.begin(write=True) as txn:
            for digest, rec in records:
                txn.put(digest.raw, _pack(rec))

    def put(self, digest: Digest, size: int, *, synced: bool = True) -> None:
        self.put_many([(digest, BlobRecord(size, time.time_ns(), 0, synced))])

    def mark_synced(self, digests: Iterable[Digest]) -> None:
        self._update("mark synced", digests, lambda r: r._replace(synced=True))

    def mark_compressed(self, digests: Iterable[Digest]) -> None:
        self._update("mark compressed", digests, lambda r: r._replace(plain=False))

    def touch_many(self, digests: Iterable[Digest]) -> None:
        now = time.time_ns()
        self._update("touch", digests, lambda r: r._replace(last_access_ns=now))

    def _update(
        self, what: str, digests: Iterable[Digest], change: Callable[[BlobRecord], BlobRecord]
    ) -> None:
        """Rewrite the records of ``digests`` that exist, in one write transaction."""
        with _mapped(what), self._env.begin(write=True) as txn:
            for d in digests:
                value = txn.get(d.raw)
                if value is not None:
                    txn.put(d.raw, _pack(change(_unpack(value))))

    def delete_many(self, digests: Iterable[Digest]) -> None:
        with _mapped("delete"), self._env.begin(write=True) as txn:
            for d in digests:
                txn.delete(d.raw)

    def items(self) -> Iterator[tuple[Digest, BlobRecord]]:
        with self._env.begin() as txn:
            for key, value in txn.cursor():
                if len(key) == 32:  # not the name of a named table
                    yield Digest(bytes(key)), _unpack(value)

    def total_bytes(self) -> int:
        return sum(rec.size for _, rec in self.items())

    def sync(self) -> None:
        self._env.sync(True)

    def __len__(self) -> int:
        with self._env.begin() as txn:
            tables = sum(1 for name in _TABLES if txn.get(name) is not None)
        return int(self._env.stat()["entries"]) - tables

    # -- executables ------------------------------------------------------------------------
    def executables(self) -> dict[Digest, ExecutableRecord]:
        table = self._table(b"executables")
        if table is None:
            return {}
        with self._env.begin(db=table) as txn:
            return {Digest(bytes(k)): ExecutableRecord(*_EXE.unpack(v)) for k, v in txn.cursor()}

    def note_mounted(self, digest: Digest) -> None:
        self._update_executable(digest, 0, time.time_ns())

    def add_pins(self, digest: Digest, delta: int) -> int:
        """Change an executable's pin count (never below 0); returns the new count."""
        return self._update_executable(digest, delta, None).pins

    def _update_executable(
        self, digest: Digest, delta: int, mounted_ns: int | None
    ) -> ExecutableRecord:
        table = self._tables[b"executables"]
        with _mapped("update executable"), self._env.begin(write=True, db=table) as txn:
            value = txn.get(digest.raw)
            old = ExecutableRecord(*_EXE.unpack(value)) if value else ExecutableRecord(0, 0)
            new = ExecutableRecord(
                max(0, old.pins + delta), old.last_mounted_ns if mounted_ns is None else mounted_ns
            )
            txn.put(digest.raw, _EXE.pack(*new))
        return new

    def forget_executables(self, digests: Iterable[Digest]) -> None:
        table = self._tables[b"executables"]
        with _mapped("forget executables"), self._env.begin(write=True, db=table) as txn:
            for d in digests:
                txn.delete(d.raw)

    # -- refs and settings ------------------------------------------------------------------
    def remember_ref(self, name: str, digest: Digest) -> None:
        table = self._tables[b"refs"]
        with _mapped("remember ref"), self._env.begin(write=True, db=table) as txn:
            if txn.get(name.encode()) != digest.raw:
                txn.put(name.encode(), digest.raw)

    def cached_ref(self, name: str) -> Digest | None:
        table = self._table(b"refs")
        if table is None:
            return None
        with self._env.begin(db=table, buffers=False) as txn:
            value = txn.get(name.encode())
        return None if value is None else Digest(value)

    def refs(self) -> dict[str, Digest]:
        table = self._table(b"refs")
        if table is None:
            return {}
        with self._env.begin(db=table) as txn:
            return {bytes(k).decode(): Digest(bytes(v)) for k, v in txn.cursor()}

    def get_setting(self, key: str) -> str | None:
        table = self._table(b"meta")
        if table is None:
            return None
        with self._env.begin(db=table, buffers=False) as txn:
            value = txn.get(key.encode())
        return None if value is None else bytes(value).decode()

    def set_setting(self, key: str, value: str) -> None:
        table = self._tables[b"meta"]
        with _mapped("set setting"), self._env.begin(write=True, db=table) as txn:
            txn.put(key.encode(), value.encode())
