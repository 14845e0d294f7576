"""The body of ``POST /v1/blobs:batch``: many encoded blobs in one request (pure).

Each record is ``digest (32 bytes) | encoding (1 byte: 0 identity, 1 zstd) | length (u32 LE)
| payload``. One request per few megabytes of small blobs replaces a PUT per blob, whose
per-request cost (client and server) bounds a cold pack of a tree of small files.
``BatchReader`` parses a body as it arrives (the fetcher stores a ``blobs:get`` answer's first
blobs while the rest is still on the wire).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from lazycaf.core import framing
from lazycaf.core.digest import DIGEST_SIZE, Digest
from lazycaf.core.errors import UsageError

__all__ = ["BatchReader", "Record", "pack_batch", "unpack_batch"]

Record = tuple[Digest, str, bytes]  # digest, encoding, payload as stored

_HEAD: Final = struct.Struct("<32sBI")
_CODES: Final = {framing.IDENTITY: 0, framing.ZSTD: 1}
_NAMES: Final = {v: k for k, v in _CODES.items()}


def pack_batch(items: Iterable[tuple[Digest, str, bytes]]) -> bytes:
    """The body of ``items``: one copy of each payload (headers and payloads joined once)."""
    pieces: list[bytes] = []
    for d, enc, payload in items:
        pieces.append(_HEAD.pack(d.raw, _CODES[enc], len(payload)))
        pieces.append(payload)
    return b"".join(pieces)


def unpack_batch(body: bytes) -> list[tuple[Digest, str, bytes]]:
    """The records of a batch body; a malformed body is a ``UsageError`` (HTTP 400)."""
    out = []
    pos = 0
    view = memoryview(body)
    while pos < len(body):
        if pos + _HEAD.size > len(body):
            raise UsageError(f"batch body truncated in a record header at byte {pos}")
        raw, code, length = _HEAD.unpack_from(body, pos)
        pos += _HEAD.size
        if code not in _NAMES or pos + length > len(body):
            raise UsageError(f"batch record at byte {pos - _HEAD.size} is malformed")
        out.append(
            (Digest(bytes(raw[:DIGEST_SIZE])), _NAMES[code], bytes(view[pos : pos + length]))
        )
        pos += length
    return out


class BatchReader:
    """Records of a batch body fed in pieces: ``feed`` returns those completed so far,
    ``finish`` says whether the body ended inside one. ``max_record`` bounds the bytes one
    record may announce (a malformed body cannot make the reader buffer gigabytes)."""

    def __init__(self, *, max_record: int) -> None:
        self._buf = bytearray()
        self._pos = 0  # bytes of the body consumed before ``_buf``
        self._max = max_record

    def feed(self, data: bytes) -> list[Record]:
        # Parsed in place: a record wholly in ``data`` is copied once (out of it), and only
        # what is left past the last whole record is kept (a body fed in megabyte pieces,
        # such as a bundle part's decoded frames, is not copied into a buffer first).
        src: bytes | bytearray = data
        if self._buf:
            self._buf += data
            src = self._buf
        out: list[Record] = []
        at = 0
        with memoryview(src) as view:
            while len(src) - at >= _HEAD.size:
                raw, code, length = _HEAD.unpack_from(src, at)
                if code not in _NAMES or length > self._max:
                    raise UsageError(f"batch record at byte {self._pos + at} is malformed")
                end = at + _HEAD.size + length
                if end > len(src):
                    break
                out.append((Digest(raw), _NAMES[code], bytes(view[at + _HEAD.size : end])))
                at = end
            if at == 0:  # inside one record still: keep (or start) the buffer as it is
                if src is data:
                    self._buf = bytearray(data)
                return out
            rest = bytearray(view[at:])
        self._buf = rest
        self._pos += at
        return out

    def finish(self) -> None:
        if self._buf:
            raise UsageError(f"batch body truncated in the record at byte {self._pos}")
