"""Hot-set bundles: a profile's prefetch plan stored as one blob, sent with one request.

A bundle is an ordinary blob whose bytes are ``lazycaf.cas.batch`` records: the plan's blobs
as the store keeps them (zstd frames or raw), in plan order, each once. A daemon streams it
with one GET and stores each record as it arrives (``fetcher.fetching.service``), where the
blob-by-blob path costs a request per few blobs on both ends; the store sends one file (a
directory) or one object (a bucket). Each record is verified on its own when it is stored,
so the bundle's own digest is never needed to trust its contents: it only names it.

``make_bundle`` builds one where the blobs are: the CAS server builds it from its own store
(``POST /v1/bundles``, ``HttpCAS.build_bundle``); a local directory or a bucket reached
directly is read and written by the caller. Blobs the store lacks are left out, and so is
everything past ``MAX_BUNDLE_BLOBS`` blobs or ``MAX_BUNDLE_BYTES`` bytes (the rest of the
plan is prefetched blob by blob). ``Bundle.blobs`` lists what it holds, in order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from lazycaf.cas.batch import Record, pack_batch
from lazycaf.core.digest import Digest
from lazycaf.core.errors import UsageError

if TYPE_CHECKING:
    from lazycaf.cas.api import CAS

__all__ = [
    "MAX_BUNDLE_BLOBS",
    "MAX_BUNDLE_BYTES",
    "Bundle",
    "assemble",
    "make_bundle",
]

MAX_BUNDLE_BLOBS: Final = 8192
MAX_BUNDLE_BYTES: Final = 256 << 20  # bytes of records: the whole bundle is held in memory
_READ_GROUP: Final = 512  # blobs read from the store per request while assembling

ReadMany = Callable[[list[Digest]], Awaitable[list[Record]]]


@dataclass(frozen=True)
class Bundle:
    digest: Digest
    blobs: tuple[Digest, ...]  # what it holds, in order
    size: int  # bytes of the bundle blob

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest.hex, "blobs": [d.hex for d in self.blobs], "bytes": self.size}

    @classmethod
    def from_json(cls, obj: Any) -> Bundle:
        """``ValueError`` if ``obj`` is not a bundle's JSON."""
        if not isinstance(obj, dict) or not isinstance(obj.get("blobs"), list):
            raise ValueError(f"bad bundle {obj!r:.100}")
        size = obj.get("bytes")
        if not isinstance(size, int) or size < 0 or len(obj["blobs"]) > MAX_BUNDLE_BLOBS:
            raise ValueError(f"bad bundle {obj!r:.100}")
        try:
            return cls(
                Digest.parse(str(obj.get("digest"))),
                tuple(Digest.parse(str(h)) for h in obj["blobs"]),
                size,
            )
        except UsageError as exc:
            raise ValueError(str(exc)) from None


async def assemble(read_many: ReadMany, digests: Sequence[Digest]) -> tuple[bytes, list[Digest]]:
    """The bundle of ``digests`` (its bytes, and the blobs it holds in order), read from a
    store with ``read_many`` (stored records of the blobs present, in the order asked)."""
    wanted = list(dict.fromkeys(digests))[:MAX_BUNDLE_BLOBS]
    records: list[Record] = []
    size = 0
    for start in range(0, len(wanted), _READ_GROUP):
        for record in await read_many(wanted[start : start + _READ_GROUP]):
            size += len(record[2]) + 37
            if size > MAX_BUNDLE_BYTES:
                break
            records.append(record)
        else:
            continue
        break
    body = await trio.to_thread.run_sync(pack_batch, records)
    return body, [r[0] for r in records]


async def make_bundle(cas: CAS, digests: Sequence[Digest]) -> Bundle:
    """Build and store the bundle of ``digests`` in ``cas`` (the server builds it when ``cas``
    is one; else it is read and written here)."""
    build = getattr(cas, "build_bundle", None)
    if build is not None:  # the HTTP CAS: built where the blobs are
        bundle: Bundle = await build(digests)
        return bundle

    async def read_many(part: list[Digest]) -> list[Record]:
        got = await cas.get_many_encoded(part)
        return [(d, *got[d]) for d in part if d in got]

    body, blobs = await assemble(read_many, digests)
    digest = await trio.to_thread.run_sync(Digest.of, body)
    await cas.put(digest, body)
    return Bundle(digest, tuple(blobs), len(body))
