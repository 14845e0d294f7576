"""Hot-set bundles: a profile's prefetch plan stored as a few blobs, each sent with one request.

A bundle is a list of *parts*, each an ordinary blob holding the plan's blobs in plan order,
each once, decoded and compressed together (``lazycaf.cas.bundlepart``: small files share a
zstd frame where the store keeps a frame each), cut into parts of 1 MiB, then 2, 4 and 8 MiB
of the blobs as stored (the first blobs land early, and a part whose blobs a run already
fetched on its own is not sent at all: a single blob for the whole hot set would send them
twice where the link is slower than the run). A daemon streams each part with one GET and
stores each record as it arrives (``fetcher.fetching.service``), where the blob-by-blob path
costs a request per few blobs on both ends; the store sends one file (a directory) or one
object (a bucket) a part. Each record is verified on its own when it is stored, so a part's
own digest is never needed to trust its contents: it only names it.

``make_bundle`` builds one where the blobs are: the CAS server builds it from its own store
(``POST /v1/bundles``, ``HttpCAS.build_bundle``); a local directory or a bucket reached
directly is read and written by the caller. Blobs the store lacks are left out, and so is
everything past ``MAX_BUNDLE_BLOBS`` blobs, ``MAX_BUNDLE_BYTES`` bytes as stored or
``MAX_BUNDLE_DECODED`` decoded (the rest of the plan is prefetched blob by blob). A part also
ends before ``PART_DECODED`` decoded bytes: blobs that compress to almost nothing (a file of
zeros) must not make the builder decode gigabytes for an 8 MiB part, nor build a part its
readers refuse (``bundlepart.MAX_PART_DECODED``). ``Bundle.blobs`` lists what it holds, in
order.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from lazycaf.cas.batch import Record
from lazycaf.cas.bundlepart import pack_part
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError, UsageError

if TYPE_CHECKING:
    from lazycaf.cas.api import CAS

__all__ = [
    "MAX_BUNDLE_BLOBS",
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_DECODED",
    "PART_DECODED",
    "Bundle",
    "Part",
    "assemble",
    "make_bundle",
    "store_parts",
]

MAX_BUNDLE_BLOBS: Final = 8192
MAX_BUNDLE_BYTES: Final = 256 << 20  # bytes of records in all parts
FIRST_PART: Final = 1 << 20  # bytes of records in the first part, doubling up to ...
PART: Final = 8 << 20  # ... this (a record larger than a part is a part of its own)
PART_DECODED: Final = 64 << 20  # decoded bytes of a part (a larger record: a part of its own)
MAX_BUNDLE_DECODED: Final = 1 << 30  # decoded bytes of all parts
_READ_GROUP: Final = 512  # blobs read from the store per request while assembling
_HEAD: Final = 37  # a batch record's header

ReadMany = Callable[[list[Digest]], Awaitable[list[Record]]]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    digest: Digest
    blobs: tuple[Digest, ...]  # what it holds, in order
    size: int  # bytes of the part's blob
    stored: int = -1  # bytes of its blobs as the store keeps them (-1: as ``size``)
    decoded: int = -1  # bytes of its blobs decoded (-1: not recorded, an older part)

    @property
    def stored_bytes(self) -> int:
        """What the part's blobs take as stored: what ``MAX_BUNDLE_BYTES`` and the parts'
        cuts count (a compressed part is smaller; the older form is the same)."""
        return self.size if self.stored < 0 else self.stored

    def to_json(self) -> dict[str, Any]:
        out = {"digest": self.digest.hex, "blobs": [d.hex for d in self.blobs], "bytes": self.size}
        for key, value in (("stored", self.stored), ("decoded", self.decoded)):
            if value >= 0:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Part:
        if not isinstance(obj, dict) or not isinstance(obj.get("blobs"), list):
            raise ValueError(f"bad bundle part {obj!r:.100}")
        size = obj.get("bytes")
        stored, decoded = obj.get("stored", -1), obj.get("decoded", -1)
        if not isinstance(size, int) or size < 0 or not isinstance(stored, int):
            raise ValueError(f"bad bundle part {obj!r:.100}")
        if not isinstance(decoded, int):
            raise ValueError(f"bad bundle part {obj!r:.100}")
        return cls(
            Digest.parse(str(obj.get("digest"))),
            tuple(Digest.parse(str(h)) for h in obj["blobs"]),
            size,
            max(stored, -1),
            max(decoded, -1),
        )


@dataclass(frozen=True)
class Bundle:
    parts: tuple[Part, ...]

    @functools.cached_property
    def blobs(self) -> tuple[Digest, ...]:
        return tuple(d for p in self.parts for d in p.blobs)

    @functools.cached_property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @functools.cached_property
    def stored(self) -> int:
        """Bytes of its blobs as stored (what ``MAX_BUNDLE_BYTES`` bounds)."""
        return sum(p.stored_bytes for p in self.parts)

    @functools.cached_property
    def decoded(self) -> int:
        """Bytes of its blobs decoded (what ``MAX_BUNDLE_DECODED`` bounds; parts that did
        not record it count 0)."""
        return sum(max(p.decoded, 0) for p in self.parts)

    @property
    def digest(self) -> Digest:
        """A name for the whole bundle (its parts' digests hashed; no blob of its own)."""
        return Digest.of(b"".join(p.digest.raw for p in self.parts))

    def to_json(self) -> dict[str, Any]:
        return {"parts": [p.to_json() for p in self.parts]}

    @classmethod
    def from_json(cls, obj: Any) -> Bundle:
        """``ValueError`` if ``obj`` is not a bundle's JSON."""
        if not isinstance(obj, dict) or not isinstance(obj.get("parts"), list):
            raise ValueError(f"bad bundle {obj!r:.100}")
        try:
            bundle = cls(tuple(Part.from_json(p) for p in obj["parts"]))
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        if len(bundle.blobs) > MAX_BUNDLE_BLOBS:
            raise ValueError(f"a bundle of more than {MAX_BUNDLE_BLOBS} blobs")
        return bundle


async def assemble(
    read_many: ReadMany, digests: Sequence[Digest]
) -> list[tuple[bytes, list[Digest], int, int]]:
    """The parts of the bundle of ``digests`` (each part's bytes, the blobs it holds in
    order, and their bytes as stored and decoded), read from a store with ``read_many``
    (stored records of the blobs present, in the order asked)."""
    wanted = list(dict.fromkeys(digests))[:MAX_BUNDLE_BLOBS]
    parts: list[list[Record]] = [[]]
    decoded_of: list[int] = [0]  # each part's decoded bytes
    cap, part_bytes, total = FIRST_PART, 0, 0
    total_decoded = 0
    for start in range(0, len(wanted), _READ_GROUP):
        for record in await read_many(wanted[start : start + _READ_GROUP]):
            size = len(record[2]) + _HEAD
            try:
                decoded = framing.decoded_size(record[1], record[2], what=f"blob {record[0]}")
            except IntegrityError as exc:  # damaged in the store: its readers fetch it alone
                log.warning("bundle: %s; left out", exc)
                continue
            total += size
            total_decoded += decoded
            if total > MAX_BUNDLE_BYTES or total_decoded > MAX_BUNDLE_DECODED:
                break
            if parts[-1] and (part_bytes + size > cap or decoded_of[-1] + decoded > PART_DECODED):
                parts.append([])
                decoded_of.append(0)
                cap, part_bytes = min(2 * cap, PART), 0
            parts[-1].append(record)
            part_bytes += size
            decoded_of[-1] += decoded
        else:
            continue
        break
    full = [(p, n) for p, n in zip(parts, decoded_of, strict=True) if p]
    built = await trio.to_thread.run_sync(
        lambda: [pack_part(p, first=i == 0) for i, (p, _) in enumerate(full)]
    )
    return [
        (body, blobs, sum(len(r[2]) + _HEAD for r in p), n)
        for (body, blobs), (p, n) in zip(built, full, strict=True)
        if blobs
    ]


async def store_parts(
    parts: list[tuple[bytes, list[Digest], int, int]],
    put: Callable[[Digest, bytes], Awaitable[object]],
) -> Bundle:
    """Store each part with ``put`` (digest, bytes); the ``Bundle`` they make."""
    out = []
    for body, blobs, stored, decoded in parts:
        digest = await trio.to_thread.run_sync(Digest.of, body)
        await put(digest, body)
        out.append(Part(digest, tuple(blobs), len(body), stored, decoded))
    return Bundle(tuple(out))


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

    return await store_parts(await assemble(read_many, digests), cas.put)
