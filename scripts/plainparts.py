"""A hot-set bundle rewritten in the older part form, for benchmarks that set the two side by
side: each part a plain batch of its blobs as the store keeps them (``lazycaf.cas.batch``
records, a 128 KiB zstd frame each or raw) where the current form compresses the decoded
blobs together (``lazycaf.cas.bundlepart``). Readers take both forms."""

from __future__ import annotations

from lazycaf.cas.batch import pack_batch
from lazycaf.cas.bundle import Bundle, Part
from lazycaf.cas.casdir import CasDir
from lazycaf.core.digest import Digest
from lazycaf.traces.trace import Profile

__all__ = ["as_stored", "profile_as_stored"]


def as_stored(store: CasDir, bundle: Bundle) -> Bundle:
    """``bundle``'s blobs in the same parts, each part a plain batch of them as stored, written
    to ``store``."""
    parts = []
    for part in bundle.parts:
        body = pack_batch([(d, *store.read_encoded(d)) for d in part.blobs])
        digest = Digest.of(body)
        store.write(digest, body)
        parts.append(Part(digest, part.blobs, len(body), len(body)))
    return Bundle(tuple(parts))


def profile_as_stored(store: CasDir, profile: Digest) -> tuple[Digest, Bundle, Bundle]:
    """A copy of profile blob ``profile`` whose bundle is ``as_stored``, written to ``store``:
    its digest, the bundle it had, the one it has."""
    copy = Profile.decode(store.read(profile))
    if copy.bundle is None:
        raise ValueError(f"profile {profile} names no hot-set bundle")
    before = copy.bundle
    copy.bundle = as_stored(store, before)
    data = copy.encode()
    digest = Digest.of(data)
    store.write(digest, data)
    return digest, before, copy.bundle
