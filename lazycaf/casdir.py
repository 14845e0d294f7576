"""A CAS directory on local disk: the layout, atomic writes, refs (sync code, no trio).

Layout::

    <root>/blobs/<2 hex>/<hex>        a blob kept raw (it did not compress)
    <root>/blobs/<2 hex>/<hex>.zst    a blob as independent zstd frames (see ``framing``)
    <root>/refs/<name>                a named ref: the manifest digest in hex
    <root>/tmp/                       writes in flight

Invariants: a blob file appears only after its content was verified against its name, and
only by ``os.replace`` of a fully written, fsynced temp file, so a crash leaves at most a
stray temp file, never a blob that reads wrong. A ``.zst`` file always has the layout
``framing.encode`` gives (aligned frames of 128 KiB of data); uploads in any other layout are
re-encoded. A ref name is never also a directory of refs (``p`` and ``p/x`` conflict).

Both the embedded local CAS and the HTTP CAS server use this class; async callers reach it
through a thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Final

from lazycaf import framing
from lazycaf.digest import Digest
from lazycaf.errors import BlobNotFound, RefNotFound, UsageError

__all__ = ["CasDir", "check_ref_name"]

_REF_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]*(?:/[A-Za-z0-9][A-Za-z0-9._:@+-]*)*")
_MAX_REF: Final = 200


def check_ref_name(name: str) -> str:
    """Return ``name`` if it is a valid ref name (``trainer:latest``, ``profiles/x``)."""
    if len(name) > _MAX_REF or not _REF_RE.fullmatch(name) or ".." in name:
        raise UsageError(f"invalid ref name {name!r} (letters, digits, . _ : @ + - and /)")
    return name


class CasDir:
    """A content-addressed blob store in a directory. Thread-safe; processes may share it."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            for sub in ("blobs", "refs", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        elif not (self.root / "blobs").is_dir():
            raise UsageError(f"{self.root} is not a CAS directory (no blobs/)")

    def __repr__(self) -> str:
        return f"CasDir({str(self.root)!r})"

    # -- blobs -----------------------------------------------------------------------------
    def _path(self, digest: Digest) -> Path:
        h = digest.hex
        return self.root / "blobs" / h[:2] / h

    def has(self, digest: Digest) -> bool:
        p = self._path(digest)
        return p.with_suffix(".zst").exists() or p.exists()

    def find_missing(self, digests: list[Digest]) -> list[Digest]:
        return [d for d in digests if not self.has(d)]

    def read_encoded(self, digest: Digest) -> tuple[framing.Encoding, bytes]:
        """The stored representation (not verified: callers verify after decoding)."""
        p = self._path(digest)
        with contextlib.suppress(FileNotFoundError):
            return framing.ZSTD, p.with_suffix(".zst").read_bytes()
        try:
            return framing.IDENTITY, p.read_bytes()
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
        digest.verify(data)
        if self.has(digest):
            return False
        encoding, payload = framing.encode(data)
        self._commit(digest, encoding, payload)
        return True

    def write_encoded(
        self,
        digest: Digest,
        encoding: str,
        payload: bytes,
        *,
        max_size: int = framing.MAX_DECODED,
    ) -> bool:
        """Store a blob received encoded: decode (at most ``max_size`` bytes), verify, store.

        Frames are kept as they came when they have the layout ``framing.encode`` gives and
        save space; anything else (an identity upload, one big frame, frames that do not
        shrink the data) is re-encoded, so the store holds only the canonical layout.
        """
        data = framing.decode(encoding, payload, what=f"blob {digest}", max_size=max_size)
        digest.verify(data)
        if self.has(digest):
            return False
        keep = (
            encoding == framing.ZSTD
            and framing.is_canonical(encoding, payload)
            and len(payload) < len(data)
        )
        if not keep:
            encoding, payload = framing.encode(data)
        self._commit(digest, encoding, payload)
        return True

    def size(self, digest: Digest) -> int:
        """The blob's content size, from a stat or the frame headers (nothing decoded)."""
        p = self._path(digest)
        with contextlib.suppress(FileNotFoundError):
            payload = p.with_suffix(".zst").read_bytes()
            return framing.decoded_size(framing.ZSTD, payload, what=f"blob {digest}")
        try:
            return p.stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(digest, str(self.root)) from None

    def _commit(self, digest: Digest, encoding: str, payload: bytes) -> None:
        final = self._path(digest)
        if encoding == framing.ZSTD:
            final = final.with_suffix(".zst")
        final.parent.mkdir(exist_ok=True)
        self._atomic_write(final, payload)

    def _atomic_write(self, final: Path, payload: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=final.name[:16] + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
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

    def write_ref(self, name: str, digest: Digest) -> None:
        check_ref_name(name)
        if not self.has(digest):
            raise BlobNotFound(digest, f"{self.root} (ref {name!r} must name a stored blob)")
        final = self.root / "refs" / name
        # As in git, ``p`` and ``p/x`` cannot both be refs: one would be a file, the other
        # need it as a directory.
        if final.is_dir():
            raise _ref_conflict(name)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._atomic_write(final, (digest.hex + "\n").encode())
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            raise _ref_conflict(name) from exc


def _ref_conflict(name: str) -> UsageError:
    return UsageError(f"ref name {name!r} conflicts with an existing ref (as 'p' and 'p/x' do)")
