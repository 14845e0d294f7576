"""The walk of a tree to pack: every entry as the manifest will hold it, one column per
attribute, and the stat cache asked a directory at a time.

A directory is read whole (``os.listdir`` on its descriptor, so each ``lstat`` names the
entry relative to it), its entries made into columns with one comprehension per attribute,
and its files looked up in the stat cache as one run (``StatCache.find_run``: the run of
records the last walk saved for this directory, its paths and stat keys compared as two
slices); a directory where the run does not match asks file by file. The columns come out
in the manifest's order (paths sorted by code point) without a sort: a directory's entries
are in name order, and each subdirectory's contents go in after the last sibling that sorts
below ``name + "/"`` (``a.py`` before ``a/x``). Nothing is made per entry beyond the
column values; a ``Scanned`` only for the files to hash.
"""

from __future__ import annotations

import os
import stat
import struct
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Final, NamedTuple

from lazycaf.core.errors import PackError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, PATH_MAX, SYMLINK
from lazycaf.trees.statcache import StatCache, StatKey, pack_keys

__all__ = ["Scanned", "Walked", "walk_tree"]

_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KIND: Final = [""] * 16  # a mode's type bits (mode >> 12) -> its kind ("": refused)
_KIND[stat.S_IFREG >> 12], _KIND[stat.S_IFDIR >> 12], _KIND[stat.S_IFLNK >> 12] = FILE, DIR, SYMLINK
_REGULAR: Final = stat.S_IFREG >> 12
_I64_MIN: Final = -(1 << 63)  # the manifest's mtimes: signed 64-bit ns
_I64_MAX: Final = (1 << 63) - 1
_NLINK: Final = attrgetter("st_nlink")
_NOT_UTF8: Final = "name is not valid UTF-8"


class Scanned(NamedTuple):
    """A file to hash, as the walk saw it; ``inode`` groups hard links; ``key``: its stat
    key (None under ``--normalize`` for a ``.pyc`` the stat cache vouched for)."""

    path: str
    kind: str
    mode: int
    mtime_ns: int
    size: int
    target: str | None = None
    inode: tuple[int, int] | None = None
    key: StatKey | None = None


@dataclass(eq=False)
class Walked:
    """A walked tree as the manifest's columns, in its order: ``kinds`` with hard links
    (``h``, every path of an inode group but its first) resolved, ``modes`` masked (0 for
    links), ``targets`` one per link entry. ``found[i]``: the stat-cache record of a file it
    vouched for, else -1; ``unvouched[i]``: a file's stat key and inode (None for a file of
    one link) where ``found[i]`` is -1; ``hard_links``, ``hard_link_bytes``: the entries
    made ``h`` and the sizes their files have."""

    root_st: os.stat_result
    paths: list[str]
    kinds: list[str]
    modes: array[int]
    mtimes: array[int]
    sizes: array[int]
    targets: list[str]
    found: array[int]
    unvouched: dict[int, tuple[StatKey, tuple[int, int] | None]]
    hard_links: int = 0
    hard_link_bytes: int = 0

    def files(self) -> list[int]:
        """The entries of kind ``f``, in order."""
        return [i for i, k in enumerate(self.kinds) if k == FILE]

    def scanned(self, i: int) -> Scanned:
        key, inode = self.unvouched.get(i, (None, None))
        return Scanned(
            self.paths[i], FILE, self.modes[i], self.mtimes[i], self.sizes[i], None, inode, key
        )


_Extra = str | tuple[StatKey, tuple[int, int] | None] | None
_Identity = tuple[int, int]  # a directory's (st_dev, st_ino)


class _Dir(NamedTuple):
    """One directory read: its entries' columns in name order; ``cuts``: where each piece of
    it ends and the subdirectory whose contents follow that piece, with the (device, inode)
    its listing showed (None: the last piece)."""

    paths: list[str]
    kinds: list[str]
    modes: list[int]
    mtimes: list[int]
    sizes: list[int]
    found: list[int]
    extra: list[_Extra]  # a symlink's target, a file's (key, inode) where found is -1
    cuts: list[tuple[int, tuple[str, _Identity] | None]]


def walk_tree(
    root: Path, *, keep_setid: bool = False, statcache: StatCache | None = None
) -> Walked:
    """Walk ``root`` without following symlinks; refuse what a manifest cannot hold (a
    one-line ``PackError`` naming the path). ``statcache``: asked about each file of one
    link as the walk goes; files of more than one link are asked about once grouped, the
    first path of each inode."""
    try:
        root_st = os.stat(root)
    except OSError as exc:
        raise PackError(f"cannot pack {root}: {exc.strerror}") from exc
    if not stat.S_ISDIR(root_st.st_mode):
        raise PackError(f"cannot pack {root}: not a directory")
    reader = _Reader(root, 0o7777 if keep_setid else 0o1777, statcache)
    out = Walked(root_st, [], [], array("H"), array("q"), array("Q"), [], array("q"), {})
    extra: list[_Extra] = []
    try:
        top = ("", (root_st.st_dev, root_st.st_ino))
        stack = [(reader.read(*top), 0, 0)]  # a directory, its next cut, where its piece starts
        while stack:
            d, k, start = stack[-1]
            if k == len(d.cuts):
                stack.pop()
                continue
            end, sub = d.cuts[k]
            stack[-1] = (d, k + 1, end)
            _append(out, extra, d, start, end)
            if sub is not None:
                stack.append((reader.read(*sub), 0, 0))
    finally:
        os.close(reader.root_fd)
    _resolve_links(out, extra, statcache)
    return out


def _append(out: Walked, extra: list[_Extra], d: _Dir, start: int, end: int) -> None:
    out.paths += d.paths[start:end]
    out.kinds += d.kinds[start:end]
    out.modes.extend(d.modes[start:end])
    out.mtimes.extend(d.mtimes[start:end])
    out.sizes.extend(d.sizes[start:end])
    out.found.extend(d.found[start:end])
    extra += d.extra[start:end]


def _resolve_links(out: Walked, extra: list[_Extra], statcache: StatCache | None) -> None:
    """The symlinks' targets and the unvouched files, in entry order; every path of a
    hard-linked inode but the first (in manifest order, the file) made a hard link to it;
    each group's file asked about in the stat cache."""
    first_of: dict[tuple[int, int], int] = {}
    for i, x in [(i, x) for i, x in enumerate(extra) if x is not None]:
        if isinstance(x, str):
            out.targets.append(x)
            continue
        key, inode = x
        if inode is None:
            out.unvouched[i] = x
            continue
        first = first_of.setdefault(inode, i)
        if first != i:
            out.hard_links += 1
            out.hard_link_bytes += out.sizes[i]
            out.kinds[i], out.modes[i], out.mtimes[i], out.sizes[i] = HARDLINK, 0, 0, 0
            out.targets.append(out.paths[first])
        elif statcache is not None and (at := statcache.find(out.paths[i], key)) is not None:
            out.found[i] = at
        else:
            out.unvouched[i] = x


class _Reader:
    """Reads one directory at a time below an open root."""

    def __init__(self, root: Path, mask: int, statcache: StatCache | None) -> None:
        self.root, self.mask, self.statcache = root, mask, statcache
        try:
            self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise PackError(f"cannot read directory {root}: {exc.strerror}") from exc

    def read(self, rel: str, listed: _Identity) -> _Dir:
        """Directory ``rel``, which must be the directory its parent listed (``listed``):
        it is opened by its path below the root, and ``O_NOFOLLOW`` guards only the last
        name, so a parent swapped for a symlink meanwhile would lead outside the tree."""
        try:
            fd = os.open(rel or ".", _OPEN_DIR, dir_fd=self.root_fd)
        except OSError as exc:
            raise PackError(f"cannot read directory {self._shown(rel)}: {exc.strerror}") from exc
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != listed:
                raise PackError(
                    f"cannot pack {self._shown(rel)}: it was replaced while packing "
                    "(moved, or a directory above it swapped for a link)"
                )
            try:
                names = sorted(os.listdir(fd))
            except OSError as exc:
                raise PackError(
                    f"cannot read directory {self._shown(rel)}: {exc.strerror}"
                ) from exc
            prefix = f"{rel}/" if rel else ""
            paths = [prefix + n for n in names]
            if names and (
                not "".join(names).isascii() or len(prefix) + max(map(len, names)) > PATH_MAX
            ):
                for p in paths:  # else each is valid UTF-8 of len(p) bytes
                    self._check_path(p)
            lstat = os.stat
            try:
                sts = [lstat(n, dir_fd=fd, follow_symlinks=False) for n in names]
            except OSError:
                sts = [self._stat(fd, n, p) for n, p in zip(names, paths, strict=True)]
            return self._columns(fd, paths, names, sts)
        finally:
            os.close(fd)

    def _columns(
        self, fd: int, paths: list[str], names: list[str], sts: list[os.stat_result]
    ) -> _Dir:
        raw_modes = [st.st_mode for st in sts]
        n = len(paths)
        types = [m >> 12 for m in raw_modes]
        if types.count(_REGULAR) == n:  # every entry a file (most directories of a big tree)
            kinds, others = [FILE] * n, []
        else:
            kinds = [_KIND[t] for t in types]
            others = [i for i, k in enumerate(kinds) if k != FILE]
        mask = self.mask
        modes = [m & mask for m in raw_modes]
        mtimes = [st.st_mtime_ns for st in sts]
        if mtimes and (min(mtimes) < _I64_MIN or max(mtimes) > _I64_MAX):
            bad = next(i for i, t in enumerate(mtimes) if not _I64_MIN <= t <= _I64_MAX)
            raise PackError(
                f"cannot pack {self._shown(paths[bad])}: its mtime is outside what a manifest "
                "holds (nanoseconds in 64 bits: the years 1677 to 2262)"
            )
        sizes = [st.st_size for st in sts]
        extra: list[_Extra] = [None] * n
        subdirs: list[int] = []
        for i in others:
            kind = kinds[i]
            if kind == DIR:
                sizes[i] = 0
                subdirs.append(i)
            elif kind == SYMLINK:
                target = self._readlink(fd, names[i], paths[i])
                extra[i], modes[i], sizes[i] = target, 0, len(target.encode())
            else:
                self._refuse(paths[i], raw_modes[i])
        found = [-1] * n
        if not others:
            if n:
                found = self._lookup(paths, sts, mtimes, sizes, extra) or found
        elif files := [i for i, k in enumerate(kinds) if k == FILE]:
            f_extra: list[_Extra] = [None] * len(files)
            f_found = self._lookup(
                [paths[i] for i in files],
                [sts[i] for i in files],
                [mtimes[i] for i in files],
                [sizes[i] for i in files],
                f_extra,
            )
            for j, i in enumerate(files):
                extra[i] = f_extra[j]
                if f_found is not None:
                    found[i] = f_found[j]
        cuts: list[tuple[int, tuple[str, _Identity] | None]] = []
        if subdirs:  # a subdirectory's contents follow its siblings that sort below "name/"
            after = sorted(
                (names[i] + "/", paths[i], (sts[i].st_dev, sts[i].st_ino)) for i in subdirs
            )
            cuts = [(bisect_left(names, key), (path, listed)) for key, path, listed in after]
        cuts.append((n, None))
        return _Dir(paths, kinds, modes, mtimes, sizes, found, extra, cuts)

    def _lookup(
        self,
        paths: list[str],
        sts: list[os.stat_result],
        mtimes: list[int],
        sizes: list[int],
        extra: list[_Extra],
    ) -> list[int] | None:
        """One directory's files: the stat-cache records of those it vouches for (-1 for
        the others; None: none), and in ``extra`` the others' stat keys and inodes (a file
        of more than one link is asked about once its group is known: ``_resolve_links``).
        The directory's files are asked about as one run first."""
        ctimes = [st.st_ctime_ns for st in sts]
        inos = [st.st_ino for st in sts]
        devs = [st.st_dev for st in sts]
        cache = self.statcache
        multi = max(map(_NLINK, sts)) > 1
        if cache is not None and not multi:
            try:
                packed = pack_keys(sizes, mtimes, ctimes, inos, devs)
            except struct.error:  # no stat gives such a key: asked file by file, missed
                packed = b""
            run = cache.find_run(paths, packed, max(mtimes)) if packed else None
            if run is not None:
                return list(range(run, run + len(paths)))
        keys = list(zip(sizes, mtimes, ctimes, inos, devs, strict=True))
        found = None
        for j, key in enumerate(keys):
            if multi and sts[j].st_nlink > 1:
                extra[j] = (key, (key[4], key[3]))
                continue
            at = None if cache is None else cache.find(paths[j], key)
            if at is None:
                extra[j] = (key, None)
            else:
                if found is None:
                    found = [-1] * len(keys)
                found[j] = at
        return found

    def _stat(self, fd: int, name: str, rel: str) -> os.stat_result:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            raise PackError(f"cannot stat {self._shown(rel)}: {exc.strerror}") from exc

    def _readlink(self, fd: int, name: str, rel: str) -> str:
        try:
            target = os.readlink(name, dir_fd=fd)
        except OSError as exc:
            raise PackError(f"cannot read link {self._shown(rel)}: {exc.strerror}") from exc
        try:
            target.encode("utf-8")
        except UnicodeEncodeError:
            raise PackError(f"cannot pack {rel + ' (symlink target)'!r}: {_NOT_UTF8}") from None
        return target

    def _refuse(self, rel: str, mode: int) -> None:
        kind = (
            "device"
            if stat.S_ISBLK(mode) or stat.S_ISCHR(mode)
            else "fifo"
            if stat.S_ISFIFO(mode)
            else "socket"
            if stat.S_ISSOCK(mode)
            else "special file"
        )
        raise PackError(f"cannot pack {self.root / rel}: a {kind} (only files, dirs and links)")

    def _check_path(self, rel: str) -> None:
        try:
            size = len(rel.encode())
        except UnicodeEncodeError:
            raise PackError(f"cannot pack {self._shown(rel)!r}: {_NOT_UTF8}") from None
        if size > PATH_MAX:
            raise PackError(
                f"cannot pack {self._shown(rel)}: its path below {self.root} is "
                f"{size} bytes long (a manifest holds at most {PATH_MAX})"
            )

    def _shown(self, rel: str, *, keep: int = 100) -> str:
        """``root/rel`` for a one-line message, its middle cut when it is long (a path
        deeper than PATH_MAX would fill a screen)."""
        path = str(self.root / rel) if rel else str(self.root)
        if len(path) <= 2 * keep:
            return path
        return f"{path[:keep]}...{path[-keep:]} ({len(path.encode())} bytes)"
