"""The body of ``POST /v1/blobs:batch``: many encoded blobs in one request (pure).

Each record is ``digest (32 bytes) | encoding (1 byte: 0 identity, 1 zstd) | length (u32 LE)
| payload``. One request per few megabytes of small blobs replaces a PUT per blob, whose
per-request cost (client and server) bounds a cold pack of a tree of small files.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from lazycaf.core import framing
from lazycaf.core.digest import DIGEST_SIZE, Digest
from lazycaf.core.errors import UsageError

__all__ = ["pack_batch", "unpack_batch"]

_HEAD: Final = struct.Struct("<32sBI")
_CODES: Final = {framing.IDENTITY: 0, framing.ZSTD: 1}
_NAMES: Final = {v: k for k, v in _CODES.items()}


def pack_batch(items: Iterable[tuple[Digest, str, bytes]]) -> bytes:
    return b"".join(
        _HEAD.pack(d.raw, _CODES[enc], len(payload)) + payload for d, enc, payload in items
    )


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
