"""Blob encoding for the wire and for rest: independent zstd frames of at most 128 KiB of data.

Each frame holds one 128 KiB slice of the blob (the last one shorter), declares its content
size, and is compressed with a window of 128 KiB, so that a Btrfs cache can write a frame as
one compressed extent as it is, and a range read needs only the frames it covers. A blob that
does not shrink is kept raw ("identity"). Digests are always of the decoded content.

Decoding trusts nothing: frames are found from their headers (a truncated or padded payload
is an ``IntegrityError``, never a shorter blob), every frame must declare its content size,
and the declared sizes are capped before anything is decompressed, so a few bytes of upload
cannot expand to gigabytes.
"""

from __future__ import annotations

import threading
from typing import Final, Literal, NamedTuple

import zstandard

from lazycaf.core.errors import IntegrityError

__all__ = [
    "FRAME_DATA",
    "Frame",
    "IDENTITY",
    "MAX_DECODED",
    "ZSTD",
    "Encoding",
    "decode",
    "decoded_size",
    "encode",
    "frames",
    "is_canonical",
]

FRAME_DATA: Final = 128 << 10
MAX_DECODED: Final = 1 << 30  # default cap on a decoded blob: chunks are <= 64 MiB, manifests
# of a million entries about 100 MiB
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


def decode(
    encoding: str,
    payload: bytes | memoryview,
    *,
    what: str = "blob",
    max_size: int = MAX_DECODED,
) -> bytes:
    """Decode what ``encode`` produced; a corrupt or oversized payload is an IntegrityError.

    A zstd payload must be whole frames that declare their content size and use a window of
    at most 128 KiB; their declared sizes must add up to at most ``max_size`` (checked before
    anything is decompressed, so a small upload cannot expand to gigabytes). Frames holding
    more than 128 KiB decode fine here; ``is_canonical`` tells whether to re-frame them.
    """
    if encoding == IDENTITY:
        if len(payload) > max_size:
            raise IntegrityError(f"{what}: {len(payload)} bytes, over the {max_size} limit")
        return bytes(payload)
    if encoding != ZSTD:
        raise IntegrityError(f"{what}: unknown content encoding {encoding!r}")
    view = memoryview(payload)
    parsed = frames(view, what)
    total = sum(fr.content_size for fr in parsed)
    if total > max_size:
        raise IntegrityError(f"{what}: frames declare {total} bytes, over the {max_size} limit")
    dctx = _decompressor()
    parts = []
    for fr in parsed:
        try:
            part = dctx.decompress(view[fr.start : fr.end])
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what}: corrupt zstd frame at {fr.start} ({exc})") from exc
        if len(part) != fr.content_size:  # zstd checks this too; a decoded short frame is fatal
            raise IntegrityError(f"{what}: zstd frame at {fr.start} decodes to the wrong size")
        parts.append(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def decoded_size(encoding: str, payload: bytes | memoryview, *, what: str = "blob") -> int:
    """The size ``decode`` would return, read from the frame headers without decompressing."""
    if encoding == IDENTITY:
        return len(payload)
    if encoding != ZSTD:
        raise IntegrityError(f"{what}: unknown content encoding {encoding!r}")
    return sum(fr.content_size for fr in frames(memoryview(payload), what))


def is_canonical(encoding: str, payload: bytes | memoryview) -> bool:
    """Whether ``payload`` has the layout ``encode`` gives: every frame one aligned 128 KiB
    slice (the last one shorter, none empty). Other payloads decode, but are re-framed before
    they are stored, since caches and range reads rely on this layout."""
    if encoding == IDENTITY:
        return True
    try:
        sizes = [fr.content_size for fr in frames(memoryview(payload), "payload")]
    except IntegrityError:
        return False
    return bool(sizes) and all(s == FRAME_DATA for s in sizes[:-1]) and 0 < sizes[-1] <= FRAME_DATA


def at_rest(encoding: str, payload: bytes, data: bytes) -> tuple[Encoding, bytes]:
    """What a store keeps of a blob received as ``payload`` (which decodes to ``data``): the
    frames as they came when they have ``encode``'s layout and save space, else ``encode``'s
    own output (an identity upload, one big frame, frames that do not shrink the data). So
    every store holds only the canonical layout, and a well-formed upload is never
    recompressed."""
    if encoding == ZSTD and is_canonical(encoding, payload) and len(payload) < len(data):
        return ZSTD, payload
    return encode(data)


class Frame(NamedTuple):
    """One zstd frame of a payload: its byte range and the content size it declares."""

    start: int
    end: int
    content_size: int


_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_BLOCK_MAX: Final = 128 << 10  # zstd's own cap on what one block regenerates


def frames(view: memoryview, what: str = "payload") -> list[Frame]:
    """Split a zstd payload into frames by their frame and block headers (RFC 8878).

    Nothing is decompressed: each step reads a few header bytes, so this costs microseconds
    per frame. Refuses anything but complete standard frames with a declared content size, a
    window of at most 128 KiB and no dictionary; a frame must also have enough blocks to hold
    its declared size, which bounds what a payload can claim to expand to.
    """
    found: list[Frame] = []
    pos, n = 0, len(view)
    while pos < n:
        if bytes(view[pos : pos + 4]) != _MAGIC:
            raise IntegrityError(f"{what}: not a zstd frame at offset {pos}")
        try:
            header = zstandard.frame_header_size(view[pos:])
            params = zstandard.get_frame_parameters(view[pos:])
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what}: corrupt zstd frame header at {pos} ({exc})") from exc
        size = params.content_size
        if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
            raise IntegrityError(f"{what}: zstd frame at {pos} does not declare its size")
        window = params.window_size or size
        if window > 1 << _WINDOW_LOG:
            raise IntegrityError(f"{what}: zstd frame at {pos} has a {window}-byte window")
        if params.dict_id:
            raise IntegrityError(f"{what}: zstd frame at {pos} needs a dictionary")
        end, blocks = _walk_blocks(view, pos + header, what)
        if size > blocks * min(window, _BLOCK_MAX):
            raise IntegrityError(f"{what}: zstd frame at {pos} declares more than it holds")
        end += 4 if params.has_checksum else 0
        if end > n:
            raise IntegrityError(f"{what}: truncated zstd frame at {pos}")
        found.append(Frame(pos, end, size))
        pos = end
    return found


def _walk_blocks(view: memoryview, pos: int, what: str) -> tuple[int, int]:
    """Skip a frame's blocks from ``pos``: (offset after the last block, block count)."""
    n, blocks = len(view), 0
    while True:
        if pos + 3 > n:
            raise IntegrityError(f"{what}: truncated zstd frame (block header at {pos})")
        bits = int.from_bytes(view[pos : pos + 3], "little")
        last, kind, length = bits & 1, (bits >> 1) & 3, bits >> 3
        if kind == 3 or length > _BLOCK_MAX:
            raise IntegrityError(f"{what}: corrupt zstd block header at {pos}")
        pos += 3 + (1 if kind == 1 else length)  # an RLE block stores one byte
        blocks += 1
        if pos > n:
            raise IntegrityError(f"{what}: truncated zstd frame (block at {pos})")
        if last:
            return pos, blocks
