"""A CAS directory on local disk: the layout, atomic writes, refs (sync code, no trio).

Layout::

    <root>/blobs/<2 hex>/<hex>        a blob kept raw (it did not compress)
    <root>/blobs/<2 hex>/<hex>.zst    a blob as independent zstd frames (see ``framing``)
    <root>/refs/<name>                a named ref: the manifest digest in hex
    <root>/refs.lock                  held while a ref is written or removed
    <root>/tmp/                       writes in flight

Invariants: a blob file appears only after its content was verified against its name, and
only by ``os.replace`` of a fully written temp file that a ``syncfs`` made durable first, so a
crash leaves at most stray temp files, never a blob that reads wrong (``find_missing`` trusts
an existing blob file forever). A ``.zst`` file always has the layout ``framing.encode`` gives
(aligned frames of 128 KiB of data); uploads in any other layout are re-encoded. A ref name is
never also a directory of refs (``p`` and ``p/x`` conflict).

Group commit: one ``fsync`` per blob cost ~40% of a cold pack, so writes go in two steps.
``stage_*`` verifies a blob and writes it to ``tmp/`` without syncing; ``publish`` makes a
whole group durable with ONE ``syncfs`` of the CAS filesystem and only then renames each file
into ``blobs/``. Since every rename follows a ``syncfs``, it also makes every earlier rename
durable: the manifest a pack writes last is published after its blobs' renames are durable,
and a ref (written the same way) after its manifest's. ``write_many`` is stage + publish for a
batch; the HTTP server stages each PUT and publishes concurrent ones together. A crash
between the two steps leaves temp files only; ``CasDir(..., create=True)`` removes those older
than ``STALE_TMP_SECONDS`` (younger ones may be another process's writes in flight; nothing
ever reads them).

Both the embedded local CAS and the HTTP CAS server use this class; async callers reach it
through a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final, NamedTuple

from lazycaf.cas.gc import StoredBlob
from lazycaf.cas.refs import ANY, Expected, check_ref_name
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, RefMoved, RefNotFound, UsageError
from lazycaf.disk.syncfs import syncfs

__all__ = ["STALE_TMP_SECONDS", "CasDir", "Staged", "check_ref_name"]

STALE_TMP_SECONDS: Final = 3600.0  # a temp file this old is a crash's leftover, not a write


class Staged(NamedTuple):
    """A verified blob written to ``tmp/``: not durable and not visible until ``publish``."""

    digest: Digest
    tmp: str
    final: str


class CasDir:
    """A content-addressed blob store in a directory. Thread-safe; processes may share it."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        # Per-blob paths are plain strings (pathlib costs ~10 us a path, more than a syscall).
        self._blobs = str(self.root / "blobs")
        self._tmp = str(self.root / "tmp")
        self._shards: set[str] = set()  # shard directories known to exist
        self._tmp_names = itertools.count()
        self._zst_first = True  # touch: the form the last blob found had (a hint, unlocked)
        if create:
            for sub in ("blobs", "refs", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self.sweep_tmp()
        elif not (self.root / "blobs").is_dir():
            raise UsageError(f"{self.root} is not a CAS directory (no blobs/)")

    def __repr__(self) -> str:
        return f"CasDir({str(self.root)!r})"

    # -- blobs -----------------------------------------------------------------------------
    def _path(self, digest: Digest) -> str:
        h = digest.hex
        return f"{self._blobs}/{h[:2]}/{h}"

    def has(self, digest: Digest) -> bool:
        p = self._path(digest)
        return os.path.exists(p + ".zst") or os.path.exists(p)

    def find_missing(self, digests: list[Digest]) -> list[Digest]:
        """The digests not stored; each stored one is ``touch``ed (its age restarts)."""
        return [d for d in digests if not self.touch(d)]

    def touch(self, digest: Digest) -> bool:
        """Set a stored blob's mtime to now, so the store GC counts its age from this use
        (a pack reusing a blob that was garbage); False when it is not stored. One
        ``utime``, no stat first: a blob deleted meanwhile is reported missing, never
        refreshed after its deletion. The form (raw or ``.zst``) the last blob had is tried
        first: a miss costs a failing syscall and an exception, and tiny files are stored
        raw, most others compressed. A store this process may not write (read-only,
        another owner) is only checked for the blob."""
        p = self._path(digest)
        zst = p + ".zst"
        paths = (zst, p) if self._zst_first else (p, zst)
        for path in paths:
            try:
                os.utime(path)
            except FileNotFoundError:
                continue
            except OSError:  # EROFS, EPERM, EACCES: nothing to refresh from here
                if os.path.exists(path):
                    return True
                continue
            if path is not paths[0]:  # the other form first from now on
                self._zst_first = path is zst
            return True
        return False

    def read_encoded(self, digest: Digest) -> tuple[framing.Encoding, bytes]:
        """The stored representation (not verified: callers verify after decoding)."""
        p = self._path(digest)
        with contextlib.suppress(FileNotFoundError):
            return framing.ZSTD, _read_file(p + ".zst")
        try:
            return framing.IDENTITY, _read_file(p)
        except FileNotFoundError:
            raise BlobNotFound(digest, str(self.root)) from None

    def read(self, digest: Digest) -> bytes:
        """The blob's content, verified against its digest."""
        encoding, payload = self.read_encoded(digest)
        data = framing.decode(encoding, payload, what=f"blob {digest}")
        digest.verify(data)
        return data

    def write(self, digest: Digest, data: bytes) -> bool:
        """Verify ``data`` and store it; False when the blob was already there."""
        return self.write_many([(digest, data)]) == 1

    def write_many(self, items: Sequence[tuple[Digest, bytes]]) -> int:
        """Verify and store a batch of blobs with one ``syncfs``; returns how many were new.

        Verification is all or nothing: every item is checked before anything is written, so
        a batch holding one blob that does not match its digest raises ``DigestMismatch`` and
        stores none of the batch. Blobs already stored, or repeated in the batch, are skipped.
        An ``OSError`` while committing may leave part of the batch stored (each of those
        whole and durable) and nothing in ``tmp/``.
        """
        for digest, data in items:
            digest.verify(data)
        todo = {digest: data for digest, data in items if not self.touch(digest)}
        staged: list[Staged] = []
        try:
            for digest, data in todo.items():
                staged.append(self._stage(digest, *framing.encode(data)))
        except BaseException:
            self.discard(staged)
            raise
        return sum(self.publish(staged))

    def write_encoded(
        self,
        digest: Digest,
        encoding: str,
        payload: bytes,
        *,
        max_size: int = framing.MAX_DECODED,
    ) -> bool:
        """``stage_encoded`` and ``publish`` one blob; False when it was already there."""
        staged = self.stage_encoded(digest, encoding, payload, max_size=max_size)
        return staged is not None and self.publish([staged])[0]

    def stage_encoded(
        self,
        digest: Digest,
        encoding: str,
        payload: bytes,
        *,
        max_size: int = framing.MAX_DECODED,
    ) -> Staged | None:
        """Decode a blob received encoded (at most ``max_size`` bytes), verify it and write it
        to ``tmp/`` for ``publish``; None when it is already stored.

        What is kept is ``framing.at_rest``: frames as they came when canonical and smaller,
        else re-encoded.
        """
        data = framing.decode(encoding, payload, what=f"blob {digest}", max_size=max_size)
        digest.verify(data)
        if self.touch(digest):
            return None
        return self._stage(digest, *framing.at_rest(encoding, payload, data))

    def publish(self, staged: Sequence[Staged]) -> list[bool]:
        """Make staged blobs durable with one ``syncfs``, then visible by renaming each into
        ``blobs/``; True for each blob that is new. A blob another writer stored meanwhile is
        dropped (False). On an error, the files not yet renamed are removed and it propagates.
        """
        done = 0
        try:
            if staged:
                syncfs(self.root)  # before any rename: a renamed file has durable content
            out = []
            for s in staged:
                if self.has(s.digest):
                    os.unlink(s.tmp)
                    out.append(False)
                else:
                    try:
                        os.replace(s.tmp, s.final)
                    except FileNotFoundError:  # its shard directory removed since it was made
                        os.makedirs(os.path.dirname(s.final), exist_ok=True)
                        syncfs(self.root)
                        os.replace(s.tmp, s.final)
                    out.append(True)
                done += 1
            return out
        except BaseException:
            self.discard(staged[done:])
            raise

    def discard(self, staged: Iterable[Staged]) -> None:
        """Remove staged temp files that will not be published."""
        for s in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s.tmp)

    def sweep_tmp(self, *, older_than: float = STALE_TMP_SECONDS) -> int:
        """Remove temp files older than ``older_than`` seconds (a crash's leftovers); returns
        how many. Best effort: a file that cannot be removed is left, it is never read."""
        cutoff = time.time() - older_than
        removed = 0
        with os.scandir(self.root / "tmp") as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def size(self, digest: Digest) -> int:
        """The blob's content size, from a stat or the frame headers (nothing decoded)."""
        p = self._path(digest)
        with contextlib.suppress(FileNotFoundError):
            payload = _read_file(p + ".zst")
            return framing.decoded_size(framing.ZSTD, payload, what=f"blob {digest}")
        try:
            return os.stat(p).st_size
        except FileNotFoundError:
            raise BlobNotFound(digest, str(self.root)) from None

    def list_blobs(self) -> list[StoredBlob]:
        """Every stored blob (size on disk, mtime); files that are not blobs are skipped."""
        out = []
        for sub in sorted(os.listdir(self.root / "blobs")):
            with (
                contextlib.suppress(FileNotFoundError, NotADirectoryError),
                os.scandir(self.root / "blobs" / sub) as it,
            ):
                for entry in it:
                    name = entry.name.removesuffix(".zst")
                    if not Digest.is_hex(name) or name[:2] != sub:
                        continue
                    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                        st = entry.stat(follow_symlinks=False)
                        out.append(StoredBlob(Digest.parse(name), st.st_size, st.st_mtime))
        return out

    def delete_blobs(self, digests: Iterable[Digest]) -> int:
        """Unlink these blobs (raw or ``.zst``); returns how many were there. No sync: a
        crash may bring a deleted blob back, which only delays its deletion."""
        deleted = 0
        for digest in digests:
            p = self._path(digest)
            found = False
            for path in (p + ".zst", p):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    found = True
            deleted += found
        return deleted

    def _stage(self, digest: Digest, encoding: str, payload: bytes) -> Staged:
        h = digest.hex
        shard = f"{self._blobs}/{h[:2]}"
        if shard not in self._shards:
            # Created before the syncfs, so the directory entry is as durable as the content.
            os.makedirs(shard, exist_ok=True)
            self._shards.add(shard)
        final = f"{shard}/{h}.zst" if encoding == framing.ZSTD else f"{shard}/{h}"
        return Staged(digest, self._write_tmp(h, payload), final)

    def _write_tmp(self, name: str, payload: bytes) -> str:
        """Write ``payload`` to a new file in ``tmp/`` (mode 0600, as ``mkstemp`` makes):
        ``<name[:16]>.<pid>.<n>``, unique among live processes; a leftover of a dead one
        with the same name is skipped (``O_EXCL``)."""
        while True:
            tmp = f"{self._tmp}/{name[:16]}.{os.getpid()}.{next(self._tmp_names)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            break
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _atomic_write(self, final: Path, payload: bytes) -> None:
        # A syncfs rather than an fsync: it also makes durable the rename of the blob a ref
        # names, so a ref never survives a crash that its manifest did not.
        tmp = self._write_tmp(final.name, payload)
        try:
            syncfs(self.root)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # -- refs ------------------------------------------------------------------------------
    def read_ref(self, name: str) -> Digest:
        check_ref_name(name)
        try:
            text = (self.root / "refs" / name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise RefNotFound(name, str(self.root)) from None
        return Digest.parse(text)

    def write_ref(self, name: str, digest: Digest, *, expected: Expected = ANY) -> None:
        """Point ``name`` at ``digest``. With ``expected`` (a digest, or None for "must not
        exist yet") only if the ref is still at that value, else ``RefMoved``: a
        compare-and-swap, atomic across processes sharing this directory (a lock file)."""
        check_ref_name(name)
        if not self.has(digest):
            raise BlobNotFound(digest, f"{self.root} (ref {name!r} must name a stored blob)")
        final = self.root / "refs" / name
        # As in git, ``p`` and ``p/x`` cannot both be refs: one would be a file, the other
        # need it as a directory.
        if final.is_dir():
            raise _ref_conflict(name)
        with self._refs_locked():
            if expected is not ANY:
                try:
                    found: Digest | None = self.read_ref(name)
                except RefNotFound:
                    found = None
                if found != expected:
                    raise RefMoved(name, expected or "no ref", found or "no ref")
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                self._atomic_write(final, (digest.hex + "\n").encode())
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                raise _ref_conflict(name) from exc

    def list_refs(self) -> list[str]:
        """Every ref name, sorted (files under ``refs/`` with a valid ref name)."""
        refs = self.root / "refs"
        out = []
        for dirpath, _, files in os.walk(refs):
            for f in files:
                name = (Path(dirpath) / f).relative_to(refs).as_posix()
                with contextlib.suppress(UsageError):
                    out.append(check_ref_name(name))
        return sorted(out)

    def read_refs(self, prefix: str = "") -> dict[str, Digest]:
        """Every ref whose name starts with ``prefix`` and the digest it names (a ref removed
        between the listing and its read is left out)."""
        out = {}
        for name in self.list_refs():
            if name.startswith(prefix):
                with contextlib.suppress(RefNotFound):
                    out[name] = self.read_ref(name)
        return out

    def delete_ref(self, name: str) -> None:
        """Remove ref ``name`` (``RefNotFound`` if there is none) and the directories of
        refs it leaves empty, so ``p`` can be a ref again once ``p/x`` is gone."""
        check_ref_name(name)
        final = self.root / "refs" / name
        with self._refs_locked():
            try:
                if final.is_dir():
                    raise RefNotFound(name, str(self.root))
                os.unlink(final)
            except (FileNotFoundError, NotADirectoryError):
                raise RefNotFound(name, str(self.root)) from None
            syncfs(self.root)
            parent = final.parent
            while parent != self.root / "refs":
                try:
                    parent.rmdir()
                except OSError:  # not empty
                    break
                parent = parent.parent

    @contextlib.contextmanager
    def _refs_locked(self) -> Iterator[None]:
        fd = os.open(self.root / "refs.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _ref_conflict(name: str) -> UsageError:
    return UsageError(f"ref name {name!r} conflicts with an existing ref (as 'p' and 'p/x' do)")


def _read_file(path: str) -> bytes:
    """A whole file's bytes: one ``open``, ``fstat`` and ``read`` (no buffered file object)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)  # one byte more: EOF seen in the same call
        while len(data) != size:  # a short read, or the file grew: read to the end
            more = os.read(fd, 1 << 20)
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)
