"""The host cache's LMDB index: digest -> size and last access (the only ``lmdb`` importer).

The daemon is the one writer; mounts open the index read-only and look blobs up without a
round trip to the daemon. Blob files are the truth (a file exists only after it verified),
the index is rebuilt from them on daemon start, so commits need not be synced one by one:
the environment runs with ``sync=False`` and the daemon syncs it in batches. Never fork after
opening an ``Index`` (LMDB forbids it).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final, NamedTuple

import lmdb

from lazycaf.digest import Digest
from lazycaf.errors import Unavailable

__all__ = ["BlobRecord", "Index"]

_VALUE: Final = struct.Struct("<QQIB")  # size, last access (ns), pins, synced
_MAP_SIZE: Final = 1 << 34  # 16 GiB of address space; the file grows as needed


class BlobRecord(NamedTuple):
    """``synced`` is False until the blob file's bytes are known to be on disk (syncfs)."""

    size: int
    last_access_ns: int
    pins: int = 0
    synced: bool = True


class Index:
    """digest -> ``BlobRecord``. Thread-safe: LMDB transactions are per call."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if not readonly:
                path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(path),
                map_size=_MAP_SIZE,
                readonly=readonly,
                sync=False,
                metasync=False,
                max_readers=512,
                lock=True,
                subdir=True,
                create=not readonly,
            )
        except lmdb.Error as exc:
            raise Unavailable(f"cannot open cache index {path}: {exc}") from exc
        if not readonly:
            self._env.reader_check()  # clear reader slots of killed mounts

    def close(self) -> None:
        self._env.close()

    def get(self, digest: Digest) -> BlobRecord | None:
        with self._env.begin(buffers=False) as txn:
            value = txn.get(digest.raw)
        return None if value is None else BlobRecord(*_VALUE.unpack(value))

    def __contains__(self, digest: Digest) -> bool:
        with self._env.begin() as txn:
            return txn.get(digest.raw) is not None

    def put_many(self, records: Iterable[tuple[Digest, BlobRecord]]) -> None:
        with self._env.begin(write=True) as txn:
            for digest, rec in records:
                txn.put(digest.raw, _VALUE.pack(*rec))

    def put(self, digest: Digest, size: int, *, synced: bool = True) -> None:
        self.put_many([(digest, BlobRecord(size, time.time_ns(), 0, synced))])

    def mark_synced(self, digests: Iterable[Digest]) -> None:
        with self._env.begin(write=True) as txn:
            for d in digests:
                value = txn.get(d.raw)
                if value is not None:
                    size, access, pins, _ = _VALUE.unpack(value)
                    txn.put(d.raw, _VALUE.pack(size, access, pins, True))

    def touch_many(self, digests: Iterable[Digest]) -> None:
        now = time.time_ns()
        with self._env.begin(write=True) as txn:
            for d in digests:
                value = txn.get(d.raw)
                if value is not None:
                    size, _, pins, synced = _VALUE.unpack(value)
                    txn.put(d.raw, _VALUE.pack(size, now, pins, synced))

    def delete_many(self, digests: Iterable[Digest]) -> None:
        with self._env.begin(write=True) as txn:
            for d in digests:
                txn.delete(d.raw)

    def items(self) -> Iterator[tuple[Digest, BlobRecord]]:
        with self._env.begin() as txn:
            for key, value in txn.cursor():
                yield Digest(bytes(key)), BlobRecord(*_VALUE.unpack(value))

    def sync(self) -> None:
        self._env.sync(True)

    def __len__(self) -> int:
        return int(self._env.stat()["entries"])
