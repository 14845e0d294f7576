"""The bytes of a hot-set bundle's part (pure): records compressed together.

A part (``lazycaf.cas.bundle``) carries the blobs of a profile's hot set in plan order. Sent
as the store keeps them (a zstd frame every 128 KiB of each blob, or raw), small files cannot
compress together: for the files ``import torch`` opens that are 4 MiB or less, 24.3 MB as
the store keeps them against 11.0 MB compressed in 4 MiB frames of many files each. So a part
is written as::

    MAGIC (8 bytes) | frame | frame | ...
    frame = length (u32 LE) | one zstd frame with its content size, at most FRAME_DATA decoded

and the frames' decoded bytes, joined, are a ``lazycaf.cas.batch`` body whose records are
the blobs' decoded bytes (identity). The first part's frames start small (``RAMP``, doubling)
so that the run's first blobs land before the part has crossed the link.

Bounds against a store that sends crafted bytes: a frame longer than zstd's bound for
``FRAME_DATA``, or that says it decodes to more than ``FRAME_DATA`` (or does not say), or that
holds anything after its zstd frame, is refused; a record may announce at most
``MAX_RECORD`` bytes (a blob is at most one chunk) and a part decode to at most
``MAX_PART_DECODED``. Each record is verified against its digest where it is stored, as for
the older form of a part (a plain batch body of stored records), which ``PartReader`` and
``unpack_part`` still read: a part not starting with ``MAGIC`` is one of those.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import zstandard

from lazycaf.cas.batch import BatchReader, Record, pack_batch
from lazycaf.core import framing
from lazycaf.core.chunking import MAX_CHUNK
from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError, UsageError

__all__ = [
    "FRAME_DATA",
    "LEVEL",
    "MAGIC",
    "MAX_PART_DECODED",
    "MAX_RECORD",
    "PartReader",
    "pack_part",
    "unpack_part",
]

MAGIC: Final = b"\x89LCAFbz1"
FRAME_DATA: Final = 4 << 20  # decoded bytes of one frame (many small files share its window)
RAMP: Final = 128 << 10  # the first part's first frame, doubling up to FRAME_DATA
LEVEL: Final = 6  # built once a profile, sent to every cold host: 0.85x level 3's bytes
MAX_RECORD: Final = MAX_CHUNK + (1 << 20)  # bytes one record may announce
MAX_PART_DECODED: Final = 1 << 30
_LENGTH: Final = struct.Struct("<I")
_MAX_FRAME: Final = FRAME_DATA + (FRAME_DATA >> 7) + (4 << 10)  # above zstd's bound for it
_THREADS: Final = 2  # frames compressed at once (zstd releases the GIL)

log = logging.getLogger(__name__)


def pack_part(records: Iterable[Record], *, first: bool = False) -> tuple[bytes, list[Digest]]:
    """A part holding ``records`` (as stored: each is decoded here; one that does not decode
    is left out), and the blobs it holds in order; ``first``: the bundle's first part, whose
    frames start at ``RAMP`` bytes. CPU-bound: call it in a worker thread."""
    decoded: list[Record] = []
    for d, enc, payload in records:
        try:
            decoded.append((d, framing.IDENTITY, framing.decode(enc, payload, what=f"blob {d}")))
        except IntegrityError as exc:  # damaged in the store: its readers fetch it on their own
            log.warning("bundle: %s; left out", exc)
    body = pack_batch(decoded)
    pieces = []
    at, size = 0, RAMP if first else FRAME_DATA
    while at < len(body):
        pieces.append(memoryview(body)[at : at + size])
        at += size
        size = min(2 * size, FRAME_DATA)
    with ThreadPoolExecutor(_THREADS) as pool:
        frames = list(pool.map(_compress, pieces))
    out = [MAGIC]
    for frame in frames:
        out += (_LENGTH.pack(len(frame)), frame)
    return b"".join(out), [r[0] for r in decoded]


def _compress(piece: memoryview) -> bytes:
    return zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(piece)


def unpack_part(body: bytes) -> list[Record]:
    """The records of a whole part (either form); ``UsageError`` if it is malformed."""
    reader = PartReader()
    reader.feed(body)
    records = reader.records()
    reader.finish()
    return records


class PartReader:
    """Records of a part fed in pieces as they arrive. ``feed`` only buffers (cheap: call it
    on an event loop); ``ready`` says whether ``records`` has something to parse, which
    decompresses the frames complete so far (``compressed``: call it in a worker thread
    then); ``finish`` raises if the part ended inside a frame or a record."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._at = 0  # bytes of the part consumed before ``_buf``
        self._compressed: bool | None = None  # unknown until MAGIC's bytes are in
        self._batch = BatchReader(max_record=MAX_RECORD)
        self._decoded = 0

    @property
    def compressed(self) -> bool:
        return bool(self._compressed)

    def feed(self, data: bytes) -> None:
        self._buf += data
        if self._compressed is None and len(self._buf) >= len(MAGIC):
            self._compressed = self._buf.startswith(MAGIC)
            if self._compressed:
                del self._buf[: len(MAGIC)]
                self._at = len(MAGIC)

    @property
    def ready(self) -> bool:
        if self._compressed is None:
            return False
        if not self._compressed:
            return bool(self._buf)
        if len(self._buf) < _LENGTH.size:
            return False
        length: int = _LENGTH.unpack_from(self._buf)[0]
        return length > _MAX_FRAME or len(self._buf) >= _LENGTH.size + length

    def records(self) -> list[Record]:
        if self._compressed is None:
            return []
        if not self._compressed:
            data = bytes(self._buf)
            self._buf.clear()
            return self._batch.feed(data)
        out: list[Record] = []
        buf, at = self._buf, 0
        with memoryview(buf) as view:  # frames decoded where they lie, not copied out first
            while len(buf) - at >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buf, at)
                if length > _MAX_FRAME:
                    raise UsageError(f"bundle part frame at byte {self._at + at} is too long")
                end = at + _LENGTH.size + length
                if end > len(buf):
                    break
                out += self._batch.feed(self._decode(view[at + _LENGTH.size : end], at))
                at = end
        del buf[:at]
        self._at += at
        return out

    def _decode(self, frame: memoryview, at: int) -> bytes:
        where = f"bundle part frame at byte {self._at + at}"
        try:
            size = zstandard.frame_content_size(frame)
            if not 0 < size <= FRAME_DATA:
                raise UsageError(f"{where} decodes to {size} bytes (at most {FRAME_DATA})")
            self._decoded += size
            if self._decoded > MAX_PART_DECODED:
                raise UsageError(f"bundle part decodes to more than {MAX_PART_DECODED} bytes")
            data: bytes = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise UsageError(f"{where}: {exc}") from None
        return data

    def finish(self) -> None:
        if self._compressed is None and self._buf:
            raise UsageError(f"bundle part truncated at byte {len(self._buf)}")
        if self._compressed and self._buf:
            raise UsageError(f"bundle part truncated in the frame at byte {self._at}")
        self._batch.finish()
