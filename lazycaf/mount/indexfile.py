"""The mount's manifest index on disk: ``<cache>/manifests/<hex>.idx``, one per manifest.

The first mount of a manifest on a host validates it and writes its index (temp file, then
rename: a reader sees a whole file or none); every later mount maps that file and is ready
without decoding anything, and every mount of the executable shares its pages. A file that
does not open as the index of that manifest (torn, changed, from another version) is built
again; a cache this process cannot write to gets the index in memory only.

An index lives as long as its manifest's blob: the host cache's GC removes it with the
manifest (``BlobCache.evict``); a mount that has it mapped keeps reading it.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
from typing import Final

from lazycaf.core.digest import Digest, Hasher
from lazycaf.core.errors import ManifestError
from lazycaf.core.manifestindex import BODY_AT, ManifestIndex, build_index
from lazycaf.host.paths import CacheLayout

__all__ = ["open_index"]

log = logging.getLogger(__name__)
_READ: Final = 1 << 20


def open_index(cache: CacheLayout, digest: Digest, *, name: str) -> ManifestIndex:
    """The index of manifest ``digest``, whose blob is in ``cache`` (sync: file I/O, and
    a build of the index when there is none). ``ManifestError`` when the manifest does not
    validate."""
    path = cache.manifest_index(digest)
    try:
        return _map(path, digest)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, ManifestError) as exc:
        log.warning("manifest index %s unusable (%s): building it again", path, exc)
    data = cache.blob(digest).read_bytes()
    built = build_index(data, digest=digest, name=name)
    del data
    try:
        path.parent.mkdir(mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{digest.hex}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(built)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:  # a cache this user cannot write: the index lives in memory
        log.info("manifest index not saved (%s): kept in memory", exc)
        return ManifestIndex(built, digest=digest)
    del built
    return _map(path, digest)


def _map(path: os.PathLike[str] | str, digest: Digest) -> ManifestIndex:
    """Map the file and check it; its body is hashed from reads, not through the mapping,
    so that only the pages lookups touch count in this process's RSS."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        hasher = Hasher()
        f.seek(BODY_AT)
        while chunk := f.read(_READ):
            hasher.update(chunk)
    # the view keeps the map open as long as the index lives
    return ManifestIndex(memoryview(buf), digest=digest, body_checked=hasher.digest())
