"""Blob encoding for the wire and for rest: independent zstd frames of at most 128 KiB of data.

Each frame holds one 128 KiB slice of the blob (the last one shorter), declares its content
size, and is compressed with a window of 128 KiB, so that a Btrfs cache can write a frame as
one compressed extent as it is, and a range read needs only the frames it covers. A blob that
does not shrink is kept raw ("identity"). Digests are always of the decoded content.
"""

from __future__ import annotations

import threading
from typing import Final, Literal

import zstandard

from lazycaf.errors import IntegrityError

__all__ = ["FRAME_DATA", "IDENTITY", "ZSTD", "Encoding", "decode", "encode"]

FRAME_DATA: Final = 128 << 10
IDENTITY: Final = "identity"
ZSTD: Final = "zstd"
Encoding = Literal["identity", "zstd"]

_WINDOW_LOG: Final = 17  # 128 KiB: larger windows write fine to Btrfs but read back as EIO
_LEVEL: Final = 3
_MIN_SAVING: Final = 0.03  # keep data raw unless frames save at least this share
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread, reused across blobs.
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        params = zstandard.ZstdCompressionParameters.from_level(
            _LEVEL, window_log=_WINDOW_LOG, write_content_size=True, write_checksum=False
        )
        cctx = _local.cctx = zstandard.ZstdCompressor(compression_params=params)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor(max_window_size=1 << _WINDOW_LOG)
    return dctx


def encode(data: bytes | memoryview) -> tuple[Encoding, bytes]:
    """Encode a blob for the wire or for rest: (``"zstd"``, frames) or (``"identity"``, data)."""
    view = memoryview(data)
    cctx = _compressor()
    frames = b"".join(
        cctx.compress(view[off : off + FRAME_DATA]) for off in range(0, len(view), FRAME_DATA)
    )
    if len(view) == 0 or len(frames) > len(view) * (1 - _MIN_SAVING):
        return IDENTITY, bytes(view)
    return ZSTD, frames


def decode(encoding: str, payload: bytes, *, what: str = "blob") -> bytes:
    """Decode what ``encode`` produced; a corrupt or oversized payload is an IntegrityError."""
    if encoding == IDENTITY:
        return payload
    if encoding != ZSTD:
        raise IntegrityError(f"{what}: unknown content encoding {encoding!r}")
    try:
        reader = _decompressor().stream_reader(payload, read_across_frames=True)
        with reader:
            return reader.readall()
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: corrupt zstd payload ({exc})") from exc
