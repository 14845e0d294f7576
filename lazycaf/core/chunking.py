"""How files are split into blobs: fixed-size chunks (pure functions, no I/O).

A file at or below the chunk size is one blob; a larger file is ``ceil(size / chunk_size)``
blobs of ``chunk_size`` bytes each (the last one shorter). Fixed sizes keep every chunk
boundary block-aligned, so a read fetches only the chunks it touches, a local change
re-uploads only the chunks it touched, and materialize can reflink chunks into place.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK",
    "chunk_count",
    "chunk_spans",
    "chunks_touched",
    "validate_chunk_size",
]

DEFAULT_CHUNK_SIZE: Final = 1 << 20
_MIN_CHUNK: Final = 64 << 10
MAX_CHUNK: Final = 64 << 20  # a blob of a file is at most this long


def validate_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is a 4 KiB multiple in [64 KiB, 64 MiB], else raise."""
    if not (_MIN_CHUNK <= chunk_size <= MAX_CHUNK) or chunk_size % 4096:
        raise ValueError(
            f"chunk size must be a multiple of 4 KiB in [64 KiB, 64 MiB]: {chunk_size}"
        )
    return chunk_size


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunk digests a file of ``size`` bytes carries: 0 when it is a single blob."""
    return 0 if size <= chunk_size else -(-size // chunk_size)


def chunk_spans(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each blob of a file, in order; one span for a single-blob file."""
    if size <= chunk_size:
        return [(0, size)]
    return [(off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)]


def chunks_touched(offset: int, length: int, size: int, chunk_size: int) -> range:
    """Indices of the blobs a read of ``length`` bytes at ``offset`` touches."""
    end = min(offset + length, size)
    if end <= offset:
        return range(0)
    if size <= chunk_size:
        return range(1)
    return range(offset // chunk_size, (end - 1) // chunk_size + 1)
