"""The inode table of a mount, built once from a manifest (pure, testable without FUSE).

Inode numbers are stable for a manifest: the root is 1, entry ``i`` of the manifest is
``i + 2``, and a hard link shares the inode of its file. The tree is immutable, so there is
no allocation, no lookup counting and nothing to forget.
"""

from __future__ import annotations

from typing import Final

from lazycaf.core.manifest import DIR, HARDLINK, Entry, Manifest

__all__ = ["ROOT_INODE", "InodeTable"]

ROOT_INODE: Final = 1


class InodeTable:
    """Invariants: every inode in ``children`` values has an entry; directory listings are
    sorted by name; ``nlink`` of a file is its hard-link group size, of a directory 2 plus
    its subdirectories."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        root = Entry("", DIR, manifest.root_mode, manifest.root_mtime_ns, 0)
        self.entries: list[Entry] = [root, root, *manifest.entries]  # index = inode
        self.nlink: list[int] = [2] * len(self.entries)
        self._children: dict[int, dict[bytes, int]] = {ROOT_INODE: {}}
        self._listing: dict[int, list[tuple[bytes, int]]] = {}
        dir_inode: dict[str, int] = {"": ROOT_INODE}
        file_inode: dict[str, int] = {}
        nlink = self.nlink
        for ino, e in enumerate(manifest.entries, start=2):
            parent_path, _, name = e.path.rpartition("/")
            parent = dir_inode[parent_path]
            if e.kind == HARDLINK:
                target = file_inode[e.target or ""]
                nlink[target] += 1
                self._children[parent][name.encode()] = target
                continue
            self._children[parent][name.encode()] = ino
            if e.kind == DIR:
                dir_inode[e.path] = ino
                self._children[ino] = {}
                nlink[parent] += 1
            else:
                nlink[ino] = 1
                file_inode[e.path] = ino

    def __len__(self) -> int:
        return len(self.entries) - 1

    def entry(self, inode: int) -> Entry:
        """The entry of ``inode``; raises KeyError for an unknown inode."""
        if inode < ROOT_INODE or inode >= len(self.entries):
            raise KeyError(inode)
        return self.entries[inode]

    def lookup(self, parent: int, name: bytes) -> int | None:
        children = self._children.get(parent)
        return None if children is None else children.get(name)

    def is_dir(self, inode: int) -> bool:
        return inode in self._children

    def listing(self, inode: int) -> list[tuple[bytes, int]]:
        """(name, inode) of a directory's entries, sorted by name; cached."""
        out = self._listing.get(inode)
        if out is None:
            out = self._listing[inode] = sorted(self._children[inode].items())
        return out
