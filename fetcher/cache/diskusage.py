"""How much disk the cache's blobs really use on Btrfs, compressed (sync; root for the ioctl).

``compression(path)`` asks, in order: ``compsize`` (if installed), else the Btrfs tree
itself through ``BTRFS_IOC_TREE_SEARCH`` (what compsize does: read each file's
EXTENT_DATA items; disk bytes of an extent count once however many files share it);
elsewhere, or without CAP_SYS_ADMIN, the answer is "unknown". Dirty pages have no extents
yet, so the filesystem is synced first.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from fetcher.cache.blobcache import filesystem_type
from lazycaf.disk.syncfs import syncfs

__all__ = ["Compression", "compression"]

_SEARCH_KEY: Final = struct.Struct("<7Q4I4Q")  # btrfs_ioctl_search_key (104 bytes)
_SEARCH_ARGS: Final = 4096
_TREE_SEARCH: Final = (3 << 30) | (_SEARCH_ARGS << 16) | (0x94 << 8) | 17  # _IOWR(0x94, 17)
_HEADER: Final = struct.Struct("<3Q2I")  # transid, objectid, offset, type, len
_EXTENT: Final = struct.Struct("<QQBBHB")  # generation, ram_bytes, compression, ..., type
_EXTENT_REG: Final = struct.Struct("<4Q")  # disk_bytenr, disk_num_bytes, offset, num_bytes
_EXTENT_DATA_KEY: Final = 108
_U64: Final = (1 << 64) - 1


@dataclass(frozen=True)
class Compression:
    method: str  # compsize | tree-search | unknown
    disk_bytes: int  # on disk, compressed, shared extents once
    uncompressed_bytes: int  # the same extents uncompressed
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.uncompressed_bytes / self.disk_bytes if self.disk_bytes else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": None if self.ratio is None else round(self.ratio, 3)}


def compression(path: Path) -> Compression:
    fs = filesystem_type(path)
    if fs != "btrfs":
        return Compression("unknown", 0, 0, f"not on Btrfs ({fs})")
    syncfs(path)
    if shutil.which("compsize"):
        proc = subprocess.run(["compsize", "-b", str(path)], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            fields = line.split()
            if fields and fields[0] == "TOTAL":
                return Compression("compsize", int(fields[2]), int(fields[3]))
        if "no regular files" in proc.stderr.lower():
            return Compression("compsize", 0, 0)
    try:
        disk, raw = _tree_search(path)
    except OSError as exc:
        return Compression("unknown", 0, 0, f"BTRFS_IOC_TREE_SEARCH: {exc.strerror or exc}")
    return Compression("tree-search", disk, raw)


def _tree_search(root: Path) -> tuple[int, int]:
    extents: dict[int, tuple[int, int]] = {}  # disk_bytenr -> (disk bytes, uncompressed)
    inline_disk = inline_raw = 0
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for dirpath, _, files in os.walk(root):
            for name in files:
                ino = os.lstat(os.path.join(dirpath, name)).st_ino
                for _, data in _extent_items(dir_fd, ino):
                    _, ram, _, _, _, kind = _EXTENT.unpack_from(data)
                    if kind == 0:  # inline: the data sits in the item
                        inline_disk += len(data) - _EXTENT.size
                        inline_raw += ram
                        continue
                    bytenr, disk_num, _, _ = _EXTENT_REG.unpack_from(data, _EXTENT.size)
                    if bytenr:  # 0: a hole
                        extents[bytenr] = (disk_num, ram)
    finally:
        os.close(dir_fd)
    disk = inline_disk + sum(d for d, _ in extents.values())
    raw = inline_raw + sum(r for _, r in extents.values())
    return disk, raw


def _extent_items(fd: int, ino: int) -> list[tuple[int, bytes]]:
    items: list[tuple[int, bytes]] = []
    offset = 0
    while True:
        key = _SEARCH_KEY.pack(0, ino, ino, offset, _U64, 0, _U64, 108, 108, 512, 0, 0, 0, 0, 0)
        args = bytearray(key.ljust(_SEARCH_ARGS, b"\0"))
        fcntl.ioctl(fd, _TREE_SEARCH, args)
        count = struct.unpack_from("<I", args, 64)[0]
        if count == 0:
            return items
        pos = _SEARCH_KEY.size
        last = offset
        for _ in range(count):
            _, objectid, item_offset, item_type, length = _HEADER.unpack_from(args, pos)
            pos += _HEADER.size
            if objectid == ino and item_type == _EXTENT_DATA_KEY:
                items.append((item_offset, bytes(args[pos : pos + length])))
            last = item_offset
            pos += length
        if last == _U64:
            return items
        offset = last + 1
