"""The inode table of a mount, answered from the manifest index (pure, testable without FUSE).

Inode numbers are stable for a manifest: the root is 1, entry ``i`` of the manifest is
``i + 2``, and a hard link shares the inode of its file. The tree is immutable, so there is
no allocation, no lookup counting and nothing to forget. Nothing is built per entry up
front: lookups are binary searches in the index's per-directory child lists, and an
``Entry`` is made when one is asked for (the last few are kept, for reads).
"""

from __future__ import annotations

from typing import Final

from lazycaf.core.manifest import DIR, Entry, Manifest
from lazycaf.core.manifestindex import ROOT_INODE, ManifestIndex

__all__ = ["ROOT_INODE", "InodeTable"]

_KEPT: Final = 4096  # entries kept for repeated reads of the same files


class InodeTable:
    """Invariants: every inode ``lookup`` or ``child`` returns has an entry; directory
    listings are sorted by name bytes; ``nlink`` of a file is its hard-link group size, of a
    directory 2 plus its subdirectories. Memory does not grow with the tree beyond the
    index's buffer (shared, when it is a file's mmap) and ``_KEPT`` entries."""

    def __init__(self, index: ManifestIndex | Manifest) -> None:
        if isinstance(index, Manifest):  # tests and small trees: index it in memory
            index = ManifestIndex.build(index.encode())
        self.index = index
        self._root = Entry("", DIR, index.root_mode, index.root_mtime_ns, 0)
        self._entries: dict[int, Entry] = {}

    def __len__(self) -> int:
        return len(self.index) + 1

    def entry(self, inode: int) -> Entry:
        """The entry of ``inode``; raises KeyError for an unknown inode."""
        e = self._entries.get(inode)
        if e is not None:
            return e
        if inode == ROOT_INODE:
            return self._root
        if not 2 <= inode < len(self.index) + 2:
            raise KeyError(inode)
        e = self.index.entry(inode - 2)
        if len(self._entries) >= _KEPT:
            self._entries.clear()
        self._entries[inode] = e
        return e

    def st_mode(self, inode: int) -> int:
        if inode == ROOT_INODE:
            return self._root.st_mode
        return self.index.st_mode(inode - 2)

    def stat(self, inode: int) -> tuple[int, int, int]:
        """``(st_mode, size, mtime_ns)`` of ``inode``; KeyError for an unknown one."""
        if inode == ROOT_INODE:
            return self._root.st_mode, 0, self._root.mtime_ns
        if not 2 <= inode < len(self.index) + 2:
            raise KeyError(inode)
        return self.index.stat(inode - 2)

    def nlink(self, inode: int) -> int:
        if not ROOT_INODE <= inode < len(self.index) + 2:
            raise KeyError(inode)
        return self.index.nlink(inode)

    def lookup(self, parent: int, name: bytes) -> int | None:
        return self.index.lookup(parent, name)

    def is_dir(self, inode: int) -> bool:
        return self.index.is_dir(inode)

    def child_count(self, inode: int) -> int:
        """How many entries directory ``inode`` lists (KeyError if it is not one)."""
        if not self.is_dir(inode):
            raise KeyError(inode)
        return self.index.child_count(inode)

    def child(self, inode: int, pos: int) -> tuple[bytes, int]:
        """(name, inode) of the ``pos``-th entry of directory ``inode``, in name order."""
        i = self.index.child(inode, pos)
        return self.index.name(i), self.index.inode_of(i)

    def listing(self, inode: int) -> list[tuple[bytes, int]]:
        """(name, inode) of a directory's entries, sorted by name."""
        return [self.child(inode, pos) for pos in range(self.child_count(inode))]
